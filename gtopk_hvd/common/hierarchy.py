"""The layout of hierarchical gTop-k (ALGORITHM.md, "Hierarchical gTop-k"): N nodes of L ranks.

Framework-free.  Horovod numbers ranks host by host (``horovodrun -H a:L,b:L``), so rank p is
(node n = p // L, local rank l = p % L) when every host has L ranks; its node is the ranks
n L .. n L + L - 1, its *rail* the N ranks with the same local rank, and the rail's gTop-k
stages exchange in the flat schedule's groups (gtopk_hvd.common.schedule) mapped onto the
rail.  :func:`hierarchical_layout` decides from Horovod's sizes whether a job runs
hierarchically, and says why not when it falls back (unequal nodes, one rank a node, one node):
the decision depends only on values every rank has, so every rank takes the same one.
"""
from gtopk_hvd.common.schedule import exchange_groups

__all__ = ["HierarchicalLayout", "hierarchical_layout", "shard_bounds"]


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
