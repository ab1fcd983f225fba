"""Exceptions raised by gtopk_hvd.  Messages name the offending value and the fix."""

__all__ = ["GTopkError", "ProcessSetError"]


class GTopkError(RuntimeError):
    """A gTop-k collective could not run as configured."""


class ProcessSetError(GTopkError):
    """The two-rank process sets gTop-k needs are missing or were registered differently."""
