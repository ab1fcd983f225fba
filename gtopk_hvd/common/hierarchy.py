"""The layout of hierarchical gTop-k (ALGORITHM.md, "Hierarchical gTop-k"): N nodes of L ranks.

Framework-free.  Horovod numbers ranks host by host (``horovodrun -H a:L,b:L``), so rank p is
(node n = p // L, local rank l = p % L) when every host has L ranks; its node is the ranks
n L .. n L + L - 1, its *rail* the N ranks with the same local rank, and the rail's gTop-k
stages exchange in the flat schedule's groups (gtopk_hvd.common.schedule) mapped onto the
rail.  :func:`hierarchical_layout` decides from Horovod's sizes whether a job runs
hierarchically, and says why not when it falls back (unequal nodes, one rank a node, one node):
the decision depends only on values every rank has, so every rank takes the same one.
"""
from gtopk_hvd.common.collective import (MISMATCH, ExchangeResult, gtopk_exchange_steps,
                                         gtopk_wire_bytes, ring_bytes)
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.schedule import exchange_groups

__all__ = ["HierarchicalLayout", "hierarchical_layout", "shard_bounds",
           "hierarchical_exchange_steps", "HierarchicalExchange", "prepare_call",
           "drive_requests", "split_bytes"]


def shard_bounds(numel, parts):
    """[(lo, hi)] of the ``parts`` contiguous shards of a buffer of ``numel`` entries: shard l
    is [floor(l d / L), floor((l + 1) d / L))."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"the number of shards must be a positive int, got {parts!r}")
    return [(l * numel // parts, (l + 1) * numel // parts) for l in range(parts)]


class HierarchicalLayout:
    """N nodes (``nodes``) of L ranks (``local_size``); ``mode`` is ``"hierarchical"``, or
    ``"flat"`` / ``"node"`` (N = 1: reduce-scatter and a local top-k per shard) with
    ``reason`` saying why."""

    def __init__(self, size, local_size, mode, reason=""):
        self.size, self.local_size, self.mode, self.reason = size, local_size, mode, reason
        self.nodes = size // local_size if mode != "flat" else size

    def shard(self, numel, rank):
        """(lo, hi) of ``rank``'s shard of a buffer of ``numel`` entries."""
        return shard_bounds(numel, self.local_size)[rank % self.local_size]

    def node(self, rank):
        """The ranks of ``rank``'s node, in local-rank order."""
        n = rank // self.local_size
        return tuple(range(n * self.local_size, (n + 1) * self.local_size))

    def rail(self, rank):
        """The ranks with ``rank``'s local rank, one per node, in node order."""
        return tuple(range(rank % self.local_size, self.size, self.local_size))

    def rail_groups(self, local_rank):
        """The groups (global ranks) rail ``local_rank``'s gTop-k stages exchange in: the flat
        schedule's groups of N ranks, mapped onto the rail."""
        rail = self.rail(local_rank)
        return [tuple(rail[i] for i in group) for group in exchange_groups(len(rail))]

    def process_sets(self):
        """Every group a hierarchical step exchanges in, each once, in one order (node sets,
        then the rails' stage groups rail by rail; a group of the whole world is Horovod's
        global set), the same on every rank: what collective registration needs."""
        if self.mode == "flat":
            return []
        groups = [self.node(n * self.local_size) for n in range(self.nodes)]
        if self.mode == "hierarchical":
            for l in range(self.local_size):
                groups += [g for g in self.rail_groups(l) if g not in groups]
        return groups

    def __repr__(self):
        return (f"HierarchicalLayout({self.nodes} x {self.local_size}, {self.mode}"
                f"{': ' + self.reason if self.reason else ''})")


def hierarchical_layout(size, local_size, cross_size, homogeneous):
    """The layout of a job from Horovod's ``size()``, ``local_size()``, ``cross_size()`` and
    ``is_homogeneous()`` (every host the same number of ranks).  Falls back to flat gTop-k
    (``mode="flat"``, with the reason) when the nodes are unequal or hold one rank each, and
    to the node-only case when there is one node."""
    for name, value in (("size", size), ("local_size", local_size), ("cross_size", cross_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not homogeneous or size != local_size * cross_size:
        return HierarchicalLayout(size, 1, "flat", f"the hosts have unequal numbers of ranks "
                                  f"({size} ranks, {local_size} on this host): flat gTop-k")
    if local_size == 1:
        return HierarchicalLayout(size, 1, "flat", "one rank a node: flat gTop-k")
    if cross_size == 1:
        return HierarchicalLayout(size, local_size, "node", "one node: a reduce-scatter "
                                  "and a local top-k per shard, nothing crosses a network")
    return HierarchicalLayout(size, local_size, "hierarchical")


class HierarchicalExchange:
    """What :func:`hierarchical_exchange_steps` returns on one rank.

    values / indices: the union S of every rail's global set (global indices, sorted), the
    same on every rank.  acc: this rank's compensated shard (node sum + residual), whose
    entries ``local_indices[alive]`` (shard positions) reached S: the caller clears them to
    get the new residual.  verdict: the flags every rank shares.  shard: (lo, hi).
    local_values / wire: as in ExchangeResult (the rail's stages).  bytes_node /
    bytes_cross: what this rank put on the wire inside its node (the alltoall's shards, its
    ring allgather of the sets) and across nodes (the rail's stages); bytes_sent, their sum.
    """

    def __init__(self, values, indices, acc, local_indices, alive, verdict, shard,
                 local_values=None, wire="float32"):
        self.values, self.indices, self.acc = values, indices, acc
        self.local_indices, self.alive, self.verdict, self.shard = local_indices, alive, \
            verdict, shard
        self.local_values, self.wire = local_values, wire
        self.bytes_node = self.bytes_cross = 0

    @property
    def bytes_sent(self):
        return self.bytes_node + self.bytes_cross

    def as_exchange_result(self):
        """The :class:`~gtopk_hvd.common.collective.ExchangeResult` view (for GTopkResult)."""
        return ExchangeResult(self.values, self.indices, self.local_indices, self.alive,
                              self.verdict, self.bytes_sent, {}, self.local_values, self.wire)


def hierarchical_exchange_steps(ops, grad, residual, k, layout, rank, name="gtopk", digest=0,
                                flags=0, wire="float32"):
    """One hierarchical gTop-k step on this rank (ALGORITHM.md), as a generator of requests
    the adapter performs with Horovod and sends the answer back: ``("alltoall", parts, group,
    op name)`` (answer: the parts the group's members sent this rank, in group order) and
    ``("allgather", message, group, op name)`` (answer: the gathered tensor); groups are
    tuples of global ranks.  The same requests in the same order on every rank:

    1. node reduce-scatter: shard j of ``grad`` to local rank j (an alltoall in the node,
       ``{name}.node.rs``); the node sum of this rank's shard added in local-rank order;
    2. acc = node sum + ``residual`` (this rank's shard only), its finiteness in the flags;
    3. gTop-k along the rail (``{name}.rail.s<stage>``), k entries;
    4. node allgather of the rails' global sets with their verdicts (``{name}.node.ag``):
       every rank holds S and the verdict of every rail.

    Returns (StopIteration.value) a :class:`HierarchicalExchange`.  float16 ``wire`` applies
    to the rail stages; the node allgather carries the merged float32 values.  ``k`` and
    ``flags`` may be int32 tensors in a TensorFlow graph; the byte counts are then tensors.
    """
    local = layout.local_size
    n, l = divmod(rank, local)
    node, rail = layout.node(rank), layout.rail(rank)
    bounds = shard_bounds(int(grad.shape[0]), local)
    lo, hi = bounds[l]
    parts = yield ("alltoall", [grad[a:b] for a, b in bounds], node, f"{name}.node.rs")
    # a rank whose buffer differs in size sent parts of another length: nothing of another
    # layout is read (zeros) and MISMATCH goes along the rail to every rank
    ok = ops.holds(parts[0], hi - lo)
    for part in parts[1:]:
        ok = ops.logical_and(ok, ops.holds(part, hi - lo))
    if ok is not True:  # (eagerly in PyTorch a bool: nothing to choose when it holds)
        zeros = grad[lo:hi] * 0
        *parts, flags = ops.choose(ok, (*parts, ops.add_flag(flags, 0)),
                                   (*[zeros] * len(parts), ops.add_flag(flags, MISMATCH)))
        parts = [ops.with_length(part, hi - lo) for part in parts]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    acc = total + residual
    flags = ops.or_nonfinite(flags, acc)
    steps = gtopk_exchange_steps(ops, [acc], [k], n, len(rail),
                                 lambda st: tuple(rail[i] for i in st.group),
                                 f"{name}.rail", digest, flags, None, wire)
    try:
        request = next(steps)
        while True:
            gathered = yield ("allgather", *request)
            request = steps.send(gathered)
    except StopIteration as done:
        result = done.value[0]
    meta = ops.meta(digest, result.verdict)
    message = ops.pack(result.values, result.indices + lo, meta, "float32")
    gathered = yield ("allgather", message, node, f"{name}.node.ag")
    blocks = ops.unpack(gathered, local, "float32")
    for member, (_, _, their_meta) in zip(node, blocks):
        if member != rank:
            meta = ops.merge_meta(meta, their_meta)
    values, indices = ops.concat_sets([(v, i) for v, i, _ in blocks])
    out = HierarchicalExchange(values, indices, acc, result.local_indices, result.alive,
                               ops.flags_of(meta), (lo, hi), result.local_values, wire)
    out.bytes_cross = gtopk_wire_bytes(k, n, len(rail), wire)
    out.bytes_node = 4 * sum(b - a for j, (a, b) in enumerate(bounds) if j != l) + ring_bytes(
        node, rank, {m: ops.length(v) for m, (v, _, _) in zip(node, blocks)})
    return out


def split_bytes(results):
    """The statistics of a step's :class:`HierarchicalExchange` results: bytes sent inside
    the node (``bytes_sent_node``) and across nodes (``bytes_sent_cross``)."""
    return {"bytes_sent_node": sum(r.bytes_node for r in results),
            "bytes_sent_cross": sum(r.bytes_cross for r in results)}


def prepare_call(layout, numel, rank, density, op, algorithm, residual_numel):
    """What one hierarchical ``gtopk_allreduce`` needs, checked before any communication:
    (this rank's shard (lo, hi), its k, the plan every rank must agree on, whose digest
    travels in the headers).  ``residual_numel``: the entries of the residual passed, None for
    none; it must cover the shard."""
    if algorithm != "gtopk":
        raise ValueError(f"hierarchical=True runs gTop-k across nodes; algorithm must be "
                         f"'gtopk', got {algorithm!r}")
    lo, hi = layout.shard(numel, rank)
    if residual_numel is not None and residual_numel != hi - lo:
        raise ValueError(
            f"with hierarchical=True the residual covers this rank's shard: a float32 tensor "
            f"of {hi - lo} elements (entries {lo}..{hi} of {numel}), or None for zeros; got "
            f"{residual_numel} elements")
    plan = {"algorithm": "hierarchical", "numel": numel, "density": density, "op": op,
            "nodes": layout.nodes, "local_size": layout.local_size}
    return (lo, hi), k_for(hi - lo, density), plan


def drive_requests(steps, alltoall, allgather):
    """Run a generator of :func:`hierarchical_exchange_steps` to its end with the adapter's
    ``alltoall(parts, group, name)`` and ``allgather(message, group, name)``; its result."""
    answer = None
    try:
        while True:
            kind, payload, group, name = steps.send(answer)
            answer = (alltoall if kind == "alltoall" else allgather)(payload, group, name)
    except StopIteration as done:
        return done.value
