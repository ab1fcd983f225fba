"""Keras callbacks of gTop-k, written once as ``*Impl`` classes (as horovod/_keras/callbacks.py
does) and wrapped in a few lines by gtopk_hvd.tensorflow.keras.callbacks.

- :class:`DensityScheduleCallbackImpl` sets the density of the model's gTop-k optimizer from a
  schedule (gtopk_hvd.common.density), per epoch or per batch;
- :class:`GTopkStatsCallbackImpl` puts this rank's gTop-k statistics (density, bytes_sent,
  residual_norm by default) into ``logs``, so that History, the progress bar and TensorBoard
  show them.  Place it before the callbacks that should see them (TensorBoard, CSVLogger);
  placed after Horovod's MetricAverageCallback the values stay per rank, before it they are
  averaged over the ranks at the end of each epoch.
"""
import logging

from gtopk_hvd._keras import find_gtopk_state
from gtopk_hvd.common.density import as_schedule

__all__ = ["DensityScheduleCallbackImpl", "GTopkStatsCallbackImpl", "STATS_IN_LOGS"]

logger = logging.getLogger(__name__)

STATS_IN_LOGS = ("density", "bytes_sent", "residual_norm")


class DensityScheduleCallbackImpl(object):
    def __init__(self, density, per_batch=False, *args):
        super(DensityScheduleCallbackImpl, self).__init__(*args)
        self.schedule = as_schedule(density)
        self.per_batch = bool(per_batch)
        self.current_epoch = 0
        self.steps_per_epoch = None

    def _set(self, step):
        density = self.schedule(step)
        find_gtopk_state(self.model.optimizer).set_density(density)
        return density

    def on_train_begin(self, logs=None):
        find_gtopk_state(self.model.optimizer)  # fail at once with a clear message
        if self.per_batch:
            self.steps_per_epoch = self.params.get("steps")
            if not self.steps_per_epoch:
                raise ValueError(
                    "DensityScheduleCallback(per_batch=True) needs the number of steps per "
                    "epoch; pass steps_per_epoch= to model.fit() or use a sized dataset")

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch
        if not self.per_batch:
            self._set(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.per_batch:
            self._set(self.current_epoch * self.steps_per_epoch + batch)


class GTopkStatsCallbackImpl(object):
    def __init__(self, keys=STATS_IN_LOGS, per_batch=True, *args):
        super(GTopkStatsCallbackImpl, self).__init__(*args)
        self.keys = tuple(keys)
        self.per_batch = bool(per_batch)

    def _fill(self, logs):
        if logs is None:
            return
        stats = find_gtopk_state(self.model.optimizer).gtopk_stats()
        unknown = [key for key in self.keys if key not in stats]
        if unknown:
            raise ValueError(f"GTopkStatsCallback keys {unknown} are not gTop-k statistics; "
                             f"choose among {sorted(stats)}")
        for key in self.keys:
            logs[key] = float(stats[key])

    def on_train_begin(self, logs=None):
        find_gtopk_state(self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        if self.per_batch:
            self._fill(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._fill(logs)
