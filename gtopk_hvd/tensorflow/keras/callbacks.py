"""Keras callbacks for gTop-k training, next to Horovod's (re-exported here unchanged).

``DensityScheduleCallback`` and ``GTopkStatsCallback`` are thin wrappers of the ``*Impl``
classes in gtopk_hvd._keras.callbacks.  Horovod's ``BroadcastGlobalVariablesCallback`` and
``MetricAverageCallback`` work beside them: the residuals are not optimizer variables, so they
are never broadcast (they belong to each rank).
"""
import logging

import horovod.tensorflow.keras.callbacks as _horovod_callbacks
from horovod.tensorflow.keras.callbacks import (BroadcastGlobalVariablesCallback,
                                                LearningRateScheduleCallback,
                                                LearningRateWarmupCallback,
                                                MetricAverageCallback)
from tensorflow import keras

from gtopk_hvd._keras import callbacks as _impl
from gtopk_hvd.common.compat import forward_horovod

__all__ = ["DensityScheduleCallback", "GTopkStatsCallback", "BroadcastGlobalVariablesCallback",
           "MetricAverageCallback", "LearningRateScheduleCallback", "LearningRateWarmupCallback"]

logger = logging.getLogger(__name__)


class DensityScheduleCallback(_impl.DensityScheduleCallbackImpl, keras.callbacks.Callback):
    """Keras callback that sets the gTop-k density from a schedule at the start of every epoch
    (or, with ``per_batch=True``, of every batch).

    Args:
        density: a :class:`~gtopk_hvd.common.density.DensitySchedule` or ``callable(step)``
            (a float keeps it constant).  Per epoch, ``step`` is the epoch number; per batch it
            is the global batch number, which a schedule's ``steps_per_epoch`` turns into
            epochs.  The gTop-k paper's warm-up: ``StepwiseDensity([0.004, 0.001])``.
        per_batch: update at every batch instead of every epoch.

    Example::

        callbacks = [hvd.callbacks.DensityScheduleCallback(ExponentialWarmupDensity(0.001))]
    """

    def __init__(self, density, per_batch=False):
        super(DensityScheduleCallback, self).__init__(density, per_batch)


class GTopkStatsCallback(_impl.GTopkStatsCallbackImpl, keras.callbacks.Callback):
    """Keras callback that puts this rank's gTop-k statistics into ``logs``, so that History,
    the progress bar and TensorBoard show them.

    Put it before TensorBoard / CSVLogger in the callback list.  Horovod's
    MetricAverageCallback placed before it leaves the values per rank; placed after, it
    averages them over the ranks at the end of each epoch.

    Args:
        keys: which statistics (of ``optimizer.gtopk_stats()``): by default ``density``,
            ``bytes_sent`` (bytes this rank sent in the last step) and ``residual_norm``.
        per_batch: also fill the batch logs (the progress bar); the epoch logs always get them.
    """

    def __init__(self, keys=_impl.STATS_IN_LOGS, per_batch=True):
        super(GTopkStatsCallback, self).__init__(keys, per_batch)


# every other callback of horovod.tensorflow.keras.callbacks (BestModelCheckpoint...), unchanged
_forwarded = forward_horovod(globals(), _horovod_callbacks)
