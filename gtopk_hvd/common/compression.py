"""What the gTop-k Compressors for Horovod's own optimizers share, framework-free.

Horovod's optimizers call ``compression.compress(tensor)`` and ``compression.decompress(
tensor, ctx)`` around their allreduce and pass no name and no reduce op.  The compressor needs
both: the name keys the per-tensor residual (and orders the exchanges the same way on every
rank), the op says whether to divide by P.  :func:`horovod_call` reads them from Horovod's
calling frame:

- ``horovod.torch``'s ``_DistributedOptimizer`` (``self._parameter_names[p]``, ``self.op``);
- ``allreduce`` / ``grouped_allreduce`` of ``horovod.torch`` and ``horovod.tensorflow``
  (their ``name`` and ``op`` arguments), which Horovod's TensorFlow tape and Keras optimizer
  call.

Only Horovod's frames are read, and only these names; any other caller gets (None, None) and
the adapter falls back to its own rule (documented there).
"""
import sys


__all__ = ["horovod_call", "check_compressor_op", "check_compressor_process_set", "op_from_call",
           "require_name", "COMPRESSOR_PREFIX"]

COMPRESSOR_PREFIX = "gtopk.compressor"
_MAX_DEPTH = 8


def horovod_call(compressor):
    """(name, op, process_set) of the Horovod call that is running ``compressor.compress``
    now.

    ``name``: the parameter's name in Horovod's torch optimizer, or the ``name`` argument of
    ``allreduce`` (None when not given); ``op``: the reduce op object Horovod will use (None
    when the caller is not Horovod's, or when Horovod resolves it later from ``average``);
    ``process_set``: the process set Horovod reduces over (None when not known).
    """
    frame = sys._getframe(2)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        if module.startswith("horovod."):
            local = frame.f_locals
            owner = local.get("self")
            names = getattr(owner, "_parameter_names", None)
            if isinstance(names, dict) and "p" in local:
                return (names.get(local["p"]), getattr(owner, "op", None),
                        getattr(owner, "process_set", None))
            if local.get("compression") is compressor and ("op" in local or "name" in local):
                op = local.get("op")
                if op is None and local.get("average") is False:
                    op = "Sum"
                return local.get("name"), op, local.get("process_set")
        frame = frame.f_back
    return None, None, None


def check_compressor_process_set(process_set):
    """The gTop-k stages run in pair process sets of the whole world: a Horovod optimizer or
    allreduce over a subset cannot use the compressor (its ranks would wait for the others in
    the first exchange).  Refused before any communication."""
    set_id = getattr(process_set, "process_set_id", 0)
    if process_set is not None and set_id != 0:
        raise ValueError(
            f"Compression.gtopk reduces over every rank (its stages run in pair process sets "
            f"of the whole world), got process_set={process_set!r}; drop process_set= (the "
            f"global set) or use Compression.none for a reduction over a subset")


def require_name(name):
    """The name of a direct ``hvd.allreduce(..., compression=Compression.gtopk(...))`` call:
    it keys the tensor's residual, so it must be given (and be the same on every rank)."""
    if name is None:
        raise ValueError(
            "hvd.allreduce(..., compression=Compression.gtopk(...)) needs name=...: the name "
            "keys the tensor's residual; pass the same name on every rank")
    return str(name)


def op_from_call(call_op, default_name, op_name):
    """The reduce op name for a compressor step: Horovod's op from :func:`horovod_call`
    (None: Horovod's default, Average), mapped by ``op_name``; checked."""
    name = default_name if call_op is None else (call_op if isinstance(call_op, str)
                                                 else op_name(call_op))
    return check_compressor_op(name)


def check_compressor_op(op):
    """Average or Sum (what gTop-k computes); anything else is refused."""
    if op not in ("Average", "Sum"):
        raise ValueError(
            f"the gTop-k compressor computes sums and averages, got op={op}; pass op=hvd.Average "
            f"or op=hvd.Sum to Horovod's optimizer (Adasum, Min, Max and Product are not sparse "
            f"reductions)")
    return op
