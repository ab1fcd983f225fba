"""Per-rank communication programs of one exchange, taken from gtopk_hvd.common's schedules.

Partners, message sizes and the order of operations come from the library, not a second copy:
gTop-k's stages and groups from :func:`gtopk_hvd.common.schedule.stages_for` (the fold groups
of a P that is not a power of two included), message sizes from
:func:`gtopk_hvd.common.collective.message_bytes` (an 8-byte header, 8 bytes an entry),
k from :func:`gtopk_hvd.common.density.k_for`, the hierarchical layout, shards and rails from
:mod:`gtopk_hvd.common.hierarchy`.  Local work comes from a :class:`LocalWork` (per-entry
costs, :mod:`benchmarks.scale.calibrate`); every Horovod operation pays ``op_s`` (its
negotiation: the background thread's cycle and the coordinator's round).

Operations are those of :mod:`benchmarks.scale.simulate`.
"""
import math
from dataclasses import dataclass

from gtopk_hvd.common.collective import message_bytes
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.hierarchy import hierarchical_layout, shard_bounds
from gtopk_hvd.common.schedule import stages_for

__all__ = ["LocalWork", "METHODS", "program", "horovod_ops"]

METHODS = ("dense", "topk", "gtopk", "hierarchical")


@dataclass(frozen=True)
class LocalWork:
    """Seconds of a sparsified buffer's local work: ``fixed`` once a call, ``select`` per
    entry of the buffer (compensation, top-k selection), ``merge`` per entry merged in a stage
    (or scattered, for Top-k), ``apply`` per entry of the buffer (scatter of the result,
    residual update); ``op_s`` per Horovod operation."""
    select: float
    merge: float
    apply: float
    fixed: float = 0.0
    op_s: float = 0.0


def horovod_ops(method, size, local_size=1):
    """Horovod operations one call issues on every rank."""
    if method in ("dense", "topk") or size == 1:
        return 1
    if method == "gtopk":
        return len(stages_for(0, size))
    layout = hierarchical_layout(size, local_size, size // local_size, True)
    if layout.mode == "flat":
        return horovod_ops("gtopk", size)
    return 2 + len(stages_for(0, layout.nodes)) if layout.mode == "hierarchical" else 2


def program(method, d, density, size, rank, work, local_size=1):
    """The operations ``rank`` runs for one call of ``method`` on a buffer of ``d`` float32
    entries at ``density`` among ``size`` ranks (``local_size`` a node, for 'hierarchical')."""
    world = tuple(range(size))
    op = ("sleep", work.op_s)
    if method == "dense":
        return [op, ("ring", world, 4 * math.ceil(d / size), 2 * (size - 1))]
    k = k_for(d, density)
    if method == "topk":
        return [("sleep", work.fixed + work.select * d), op,
                ("gather", world, {m: message_bytes(k) for m in world}),
                ("sleep", work.merge * k * size + work.apply * d)]
    if method == "gtopk":
        return [("sleep", work.fixed + work.select * d),
                *_gtopk_stages(k, rank, size, lambda g: g, work),
                ("sleep", work.apply * d)]
    if method != "hierarchical":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layout = hierarchical_layout(size, local_size, size // local_size, True)
    if layout.mode == "flat":
        return program("gtopk", d, density, size, rank, work)
    node = layout.node(rank)
    lo, hi = layout.shard(d, rank)
    shard = hi - lo
    k_l = k_for(shard, density)
    widest = max(b - a for a, b in shard_bounds(d, local_size))
    ops = [op, ("alltoall", node, 4 * widest),
           ("sleep", work.fixed + work.select * shard + work.apply * shard * (local_size - 1))]
    if layout.mode == "hierarchical":
        rail = layout.rail(rank)
        ops += _gtopk_stages(k_l, rank // local_size, layout.nodes,
                             lambda g: tuple(rail[i] for i in g), work)
    ops += [op, ("gather", node, {m: message_bytes(k_l) for m in node}),
            ("sleep", work.merge * k_l * local_size + work.apply * d)]
    return ops


def _gtopk_stages(k, rank, size, to_global, work):
    ops = []
    for st in stages_for(rank, size):
        blocks = {to_global((m,))[0]: message_bytes(k if st.sends(m) else 0) for m in st.group}
        ops += [("sleep", work.op_s), ("gather", to_global(st.group), blocks),
                ("sleep", work.merge * k * len(st.senders))]
    return ops
