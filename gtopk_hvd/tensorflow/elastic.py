"""Horovod Elastic with gTop-k for TensorFlow, as ``horovod.tensorflow.elastic``: ``run`` and
Horovod's state classes (Keras: gtopk_hvd.tensorflow.keras.elastic).

A reset (a worker joins or leaves) restarts Horovod with gtopk_hvd's ``init``, so the
exchange process sets are registered for the new world.  The residuals stay with the
process (never broadcast).  A custom loop's ``tf.function`` must be built again after a
reset (``state.register_reset_callbacks``), as its traced graph holds the old world.
"""
from horovod.common.elastic import run_fn
from horovod.common.exceptions import HorovodInternalError
from horovod.tensorflow.elastic import ObjectState, TensorFlowKerasState, TensorFlowState
from horovod.tensorflow.mpi_ops import shutdown

from gtopk_hvd.common.errors import lost_worker

__all__ = ["run", "ObjectState", "TensorFlowKerasState", "TensorFlowState"]


def run(func):
    """Decorator that runs ``func(state, ...)`` elastically, as
    ``horovod.tensorflow.keras.elastic.run``: on a reset Horovod restarts with the new world
    (``gtopk_hvd.tensorflow.init``), the state is synchronised from rank 0 and ``func`` runs
    again.  A TensorFlow error from a Horovod operation (:func:`lost_worker`) counts as a lost
    worker, also one of a named operation, whose message Horovod's own wrapper does not
    recognise (it then lets the worker die); any other error is raised (Horovod's wrapper
    returns None for it)."""
    from tensorflow.python.framework.errors_impl import AbortedError, UnknownError

    def wrapper(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except (UnknownError, AbortedError) as err:
            if lost_worker(err.message):
                raise HorovodInternalError(err)
            raise
    return run_fn(wrapper, _reset)


def _reset():
    from gtopk_hvd.tensorflow import init  # the package imports this module
    shutdown()
    init()
