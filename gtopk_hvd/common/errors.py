"""Exceptions raised by gtopk_hvd.  Messages name the offending value and the fix."""

__all__ = ["GTopkError", "ProcessSetError", "lost_worker"]


class GTopkError(RuntimeError):
    """A gTop-k collective could not run as configured."""


class ProcessSetError(GTopkError):
    """The two-rank process sets gTop-k needs are missing or were registered differently."""


# what a TensorFlow error of a Horovod operation says: the operation's type, which an unnamed
# operation's node carries, or Horovod's shutdown message, which a named one (gtopk_hvd's
# exchanges: ``[[{{node DistributedSGD.0.s0}}]]``) raises with no type in it
_HOROVOD_MARKS = ("HorovodAllreduce", "HorovodAllgather", "HorovodBroadcast", "HorovodAlltoall",
                  "HorovodReducescatter", "Horovod has been shut down")


def lost_worker(message):
    """Whether a framework error's ``message`` comes from a Horovod operation (a worker was
    lost or the world changed), so that Horovod Elastic resets instead of failing
    (gtopk_hvd.tensorflow.elastic.run)."""
    return any(mark in (message or "") for mark in _HOROVOD_MARKS)
