"""Eager argument checks shared by the torch and tensorflow adapters.

Each check raises before any communication, with a message that names the value and the fix.
"""
import logging
import numbers

from gtopk_hvd.common.density import check_density, k_for
from gtopk_hvd.common.errors import GTopkError

__all__ = [
    "ALGORITHMS",
    "GRANULARITIES",
    "SUPPORTED_OPS",
    "MAX_BUFFER_NUMEL",
    "check_algorithm",
    "check_granularity",
    "check_positive_number",
    "check_positive_int",
    "check_non_negative_int",
    "check_op",
    "check_buffer_numel",
    "check_parameter_names",
    "check_world_size_on_load",
    "check_global_process_set",
    "check_compression",
    "check_gradient_predivide_factor",
    "check_no_groups",
]

logger = logging.getLogger(__name__)

ALGORITHMS = ("gtopk", "topk")
GRANULARITIES = ("model", "layer")
SUPPORTED_OPS = ("Average", "Sum")
# Indices travel as int32 (4 bytes, as in the paper's cost model).
MAX_BUFFER_NUMEL = 2 ** 31 - 1


def check_auto_link(algorithm, link, elastic, measure):
    """Refuse ``algorithm="auto"`` without a link under Horovod Elastic (``elastic``): a
    worker that joins would measure the link while the others train.  ``measure`` names the
    framework's ``measure_link``."""
    if algorithm == "auto" and link is None and elastic:
        raise ValueError(
            f"algorithm='auto' under Horovod Elastic needs link=...: a worker that joins would "
            f"measure the link while the others train. Measure it once in a fixed-size job "
            f"({measure}()) and pass link=(alpha, beta, select, overhead), or pick "
            f"algorithm='gtopk'")


def check_algorithm(algorithm, auto=False, where=None):
    """``algorithm`` if valid.  ``auto``: whether ``"auto"`` (the cheapest method per buffer
    by the cost model, gtopk_hvd.common.cost) is accepted; ``where`` names the API that
    refuses it, so the message can point at the one that takes it."""
    if algorithm == "auto" and not auto:
        raise ValueError(
            f"algorithm='auto' is not available in {where or 'this function'}: it needs a "
            f"step-to-step plan, which the optimizers keep; use algorithm='auto' with "
            f"gtopk_hvd.torch.DistributedOptimizer, gtopk_hvd.tensorflow.DistributedGradientTape "
            f"or gtopk_hvd.tensorflow.keras.DistributedOptimizer, or pick 'gtopk' / 'topk' "
            f"here")
    allowed = ALGORITHMS + (("auto",) if auto else ())
    if algorithm not in allowed:
        raise ValueError(
            f"algorithm must be one of {allowed}, got {algorithm!r}: 'gtopk' is the hypercube "
            f"gTop-k (O(k log P)), 'topk' gathers every rank's top-k (O(kP))"
            + ("; 'auto' picks per buffer the cheaper of a dense allreduce and gTop-k"
               if auto else ""))
    return algorithm


def check_granularity(granularity, bucket=False):
    """``granularity`` is 'model' or 'layer', or with ``bucket`` (PyTorch's
    DistributedOptimizer) also 'bucket'."""
    allowed = GRANULARITIES + (("bucket",) if bucket else ())
    if granularity not in allowed:
        raise ValueError(
            f"granularity must be one of {allowed}, got {granularity!r}: 'model' runs one "
            f"top-k over all gradients flattened together (as in the paper), 'layer' one per "
            f"tensor" + ("; 'bucket' one per bucket of bucket_cap_mb, exchanged while the "
                         "backward pass runs" if bucket else
                         "; 'bucket' exists in gtopk_hvd.torch.DistributedOptimizer only"))
    return granularity


def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_number(value, name, example):
    """``value`` is a finite real number > 0 (not a bool); ``example`` says what to pass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a positive number, got {value!r}; pass {example}")
    return value


def check_non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_op(op_name):
    """``op_name`` is the Horovod reduce op's name ('Average', 'Sum', 'Adasum', ...)."""
    if op_name not in SUPPORTED_OPS:
        raise ValueError(
            f"op={op_name} is not supported by gTop-k: use op=hvd.Average (the default) or "
            f"op=hvd.Sum; for {op_name} use Horovod's own DistributedOptimizer")
    return op_name


def check_buffer_numel(numel, name):
    if numel > MAX_BUFFER_NUMEL:
        raise GTopkError(
            f"buffer {name!r} has {numel} elements, more than the {MAX_BUFFER_NUMEL} that int32 "
            f"indices address; use granularity='layer' so each tensor is sparsified on its own")
    return numel


def check_parameter_names(names, expected_count, what="named_parameters"):
    """Names must be unique strings covering every parameter of the optimizer."""
    seen = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise ValueError(f"{what} has duplicate names {dups}; every parameter needs its own name")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"{what} names must be strings, got {bad[:3]!r}")
    if expected_count is not None and len(names) != expected_count:
        raise ValueError(
            f"{what} names {len(names)} parameters but the optimizer has {expected_count}; pass "
            f"named_parameters=model.named_parameters() for the same model the optimizer updates")


def check_world_size_on_load(saved_size, saved_rank, size, rank):
    """Policy for per-rank residuals in a checkpoint: keep them only on the same world.

    Residuals belong to a rank; with a different world size (or a rank mismatch) they do not
    mean anything, so they are dropped with a warning (training continues, losing at most the
    not-yet-applied residual mass).  Returns True to keep them.
    """
    if saved_size is None:
        return True
    if saved_size == size and (saved_rank is None or saved_rank == rank):
        return True
    logger.warning(
        "gtopk_hvd: checkpoint was written with world size %s (rank %s), now size %s (rank %s): "
        "dropping the saved residuals and starting them from zero", saved_size, saved_rank, size, rank)
    return False


def layout_key(hierarchy):
    """What a checkpoint records of the exchange's layout: None for flat gTop-k, else
    [mode, nodes, ranks a node] of the (layout, process sets) pair hierarchical gTop-k runs
    with (gtopk_hvd.common.hierarchy)."""
    if hierarchy is None:
        return None
    layout = hierarchy[0]
    return [layout.mode, layout.nodes, layout.local_size]


def check_layout_on_load(saved_layout, layout):
    """The world-size policy for the layout: hierarchical gTop-k keeps a residual per shard of
    a node's buffer, flat gTop-k per whole buffer, so residuals saved under another layout
    (or by a version that did not record it, read as flat) are dropped with a warning.
    Returns True to keep them."""
    saved = None if saved_layout is None else list(saved_layout)
    if saved == layout:
        return True
    def said(key):
        return "flat gTop-k" if key is None else "%s %d x %d" % tuple(key)
    logger.warning("gtopk_hvd: checkpoint was written with %s, now %s: its residuals cover "
                   "other parts of the buffers, dropping them and starting from zero",
                   said(saved), said(layout))
    return False


# Horovod arguments that gTop-k keeps in its signatures but cannot honour: each is refused
# before any communication with the same message in every framework.

def check_global_process_set(process_set):
    """gTop-k runs over the global set only (the process set with id 0)."""
    if getattr(process_set, "process_set_id", None) == 0:
        return
    raise ValueError(
        f"process_set={process_set!r} is not supported yet: gTop-k exchanges over the global "
        f"process set; leave process_set at its default (hvd.global_process_set)")


def check_compression(compression, compressions):
    """The wire ("float32" or "float16") for Horovod's ``compression``: ``Compression.none``
    or ``Compression.fp16`` (``compressions`` is the framework's ``hvd.Compression``)."""
    if compression is compressions.none:
        return "float32"
    if compression is compressions.fp16:
        return "float16"
    if type(compression).__name__ == "GTopkCompressor":
        raise ValueError(
            "compression=Compression.gtopk(...) is for Horovod's own optimizers "
            "(horovod.torch.DistributedOptimizer, horovod.tensorflow.DistributedGradientTape, "
            "horovod.tensorflow.keras.DistributedOptimizer); gtopk_hvd's DistributedOptimizer "
            "already runs gTop-k: pass density=... to it instead")
    raise ValueError(
        f"compression={getattr(compression, '__name__', compression)} is not supported: "
        f"gTop-k sends k of d entries; pass hvd.Compression.none (float32 values) or "
        f"hvd.Compression.fp16 (float16 values on the wire)")


def check_gradient_predivide_factor(factor, op="Average"):
    """Horovod's ``gradient_predivide_factor`` f: gradients are multiplied by 1/f before the
    reduction and the average by f after it.  A finite positive number, and only with
    ``op=Average`` (as in Horovod).  Returns it as a float."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            0 < float(factor) < float("inf")):
        raise ValueError(f"gradient_predivide_factor must be a finite positive number, got "
                         f"{factor!r}")
    factor = float(factor)
    if factor != 1.0 and op != "Average":
        raise ValueError(f"gradient_predivide_factor={factor} is only supported with "
                         f"op=Average (got op={op}), as in Horovod; leave it at 1.0")
    return factor


def check_no_groups(num_groups, groups):
    if num_groups or groups is not None:
        raise ValueError(
            f"num_groups={num_groups} / groups={groups!r} are not supported: gTop-k groups "
            f"tensors by granularity='model' (one buffer) or granularity='layer'")


def check_allreduce_arguments(density, op_name, algorithm, process_set, numel, name):
    """The arguments of ``gtopk_allreduce`` (both frameworks), checked before any
    communication; returns (density, numel, k)."""
    density = check_density(density)
    check_op(op_name)
    check_algorithm(algorithm, where="gtopk_allreduce")
    check_global_process_set(process_set)
    numel = check_buffer_numel(numel, name or "tensor")
    return density, numel, k_for(numel, density)


def check_hierarchical(hierarchical, algorithm, granularity, elastic=False, auto=False):
    """``hierarchical`` (bool) where an optimizer can run it: gTop-k at the model, layer or
    bucket granularity (``auto``: also ``algorithm="auto"``, the optimizers and the tape);
    ``elastic``: under Horovod Elastic, where the Compressors do not run it (the optimizers
    and the tape pass False); the error names the value and the fix."""
    if not isinstance(hierarchical, bool):
        raise ValueError(f"hierarchical must be True or False, got {hierarchical!r}")
    if hierarchical and elastic:
        raise ValueError("hierarchical=True does not run under Horovod Elastic with a "
                         "Compressor (the optimizers and the tape re-shard their residuals "
                         "when a reset changes the layout; a Compressor does not); use "
                         "gtopk_hvd's DistributedOptimizer or DistributedGradientTape, or drop "
                         "hierarchical=True for elastic jobs")
    algorithms = ("gtopk", "auto") if auto else ("gtopk",)
    if hierarchical and (algorithm not in algorithms or granularity not in ("model", "layer",
                                                                            "bucket")):
        raise ValueError(
            f"hierarchical=True runs gTop-k across nodes at granularity 'model', 'layer' or "
            f"'bucket' (PyTorch); "
            f"got algorithm={algorithm!r}, granularity={granularity!r}: pass "
            f"algorithm='gtopk' (the optimizers and the tape also take 'auto', TensorFlow's "
            f"not under Horovod Elastic) and "
            f"granularity='model' (or drop hierarchical=True)")
    return hierarchical
