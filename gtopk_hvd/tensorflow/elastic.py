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

__all__ = ["run", "ObjectState", "TensorFlowKerasState", "TensorFlowState"]

_HOROVOD_OPS = ("HorovodAllreduce", "HorovodAllgather", "HorovodBroadcast")


def run(func):
    """Decorator that runs ``func(state, ...)`` elastically, as
    ``horovod.tensorflow.keras.elastic.run``: on a reset Horovod restarts with the new world
    (``gtopk_hvd.tensorflow.init``), the state is synchronised from rank 0 and ``func`` runs
    again.  A TensorFlow error from a Horovod operation counts as a lost worker; any other
    error is raised (Horovod's own wrapper returns None for it)."""
    from tensorflow.python.framework.errors_impl import UnknownError

    def wrapper(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except UnknownError as err:
            if any(op in (err.message or "") for op in _HOROVOD_OPS):
                raise HorovodInternalError(err)
            raise
    return run_fn(wrapper, _reset)


def _reset():
    from gtopk_hvd.tensorflow import init  # the package imports this module
    shutdown()
    init()
