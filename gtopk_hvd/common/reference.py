"""NumPy reference of gTop-k S-SGD: the executable form of ALGORITHM.md.

Every backend (torch, tensorflow) is tested against :func:`gtopk_step`: it simulates all P
workers of one step, stage by stage, with the canonical merge order (the lower rank's set
first), ties broken by lower index, per-stage alive flags and fold / unfold for P not a
power of two.  Values are kept in the input dtype and added in the same order as the
backends do, so a backend's float32 result can be compared bit for bit.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
from dataclasses import dataclass, field
from typing import List

import numpy as np

from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.schedule import world_split

__all__ = [
    "SparseSet",
    "StepResult",
    "select_topk",
    "merge",
    "truncate",
    "gtopk_step",
    "topk_allgather_step",
    "hierarchical_step",
    "HierarchicalResult",
    "to_wire",
]

logger = logging.getLogger(__name__)


@dataclass
class SparseSet:
    """A sparse vector: ``indices`` sorted ascending (int64, unique) and their ``values``."""
    indices: np.ndarray
    values: np.ndarray

    def __len__(self):
        return len(self.indices)

    def dense(self, size):
        out = np.zeros(size, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out


@dataclass
class StepResult:
    """Outcome of one simulated step.

    indices: the global set (sorted, int64), identical on every rank.
    values: the summed (not averaged) values at ``indices``, in the input dtype.
    residuals: the P new residuals eps^p.
    alive: per rank, a bool array over that rank's local top-k ``local_indices[p]``: True where
      the entry's contribution is in the final set (so its residual entry was cleared).
    """
    indices: np.ndarray
    values: np.ndarray
    residuals: List[np.ndarray]
    local_indices: List[np.ndarray] = field(default_factory=list)
    alive: List[np.ndarray] = field(default_factory=list)

    def dense(self, size, average_over=1):
        out = np.zeros(size, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out / average_over if average_over != 1 else out


def select_topk(acc, k):
    """Indices (sorted ascending, int64) of the k largest |acc|, ties broken by lower index."""
    acc = np.asarray(acc)
    if not 0 <= k <= acc.size:
        raise ValueError(f"k must be in [0, {acc.size}], got {k}")
    # lexsort sorts by the last key first: descending magnitude, then ascending index.
    order = np.lexsort((np.arange(acc.size), -np.abs(acc)))
    return np.sort(order[:k]).astype(np.int64)


def merge(low, high):
    """Union of two sparse sets; values added where an index is in both (low + high)."""
    indices = np.union1d(low.indices, high.indices).astype(np.int64)
    values = np.zeros(len(indices), dtype=np.result_type(low.values, high.values))
    values[np.searchsorted(indices, low.indices)] = low.values
    values[np.searchsorted(indices, high.indices)] += high.values
    return SparseSet(indices, values)


def truncate(s, k):
    """The k entries of ``s`` with the largest |value|, ties by lower index; sorted by index."""
    if len(s) <= k:
        return s
    keep = np.sort(np.lexsort((s.indices, -np.abs(s.values)))[:k])
    return SparseSet(s.indices[keep], s.values[keep])


def _check_accs(accs, k):
    accs = [np.asarray(a) for a in accs]
    if not accs:
        raise ValueError("accs must hold one array per rank, got an empty list")
    d = accs[0].size
    for p, a in enumerate(accs):
        if a.ndim != 1 or a.size != d:
            raise ValueError(f"accs[{p}] must be 1-D of size {d} like accs[0], got shape {a.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= d:
        raise ValueError(f"k must be an int in [0, {d}], got {k!r}")
    return accs, d


def to_wire(values, wire="float32"):
    """The values as a message of ``wire`` carries them: float16 rounds to nearest (to +-inf
    beyond 65504), float32 leaves them as they are."""
    if wire == "float16":
        return np.asarray(values).astype(np.float16).astype(np.asarray(values).dtype)
    if wire != "float32":
        raise ValueError(f"wire must be 'float32' or 'float16', got {wire!r}")
    return values


def _residuals(accs, local, alive, sent, wire):
    """eps = acc with the applied entries cleared; with a float16 wire, what the rounding of
    the entry took off stays (acc - the value sent)."""
    residuals = []
    for p, a in enumerate(accs):
        eps = a.copy()
        applied = local[p][alive[p]]
        eps[applied] = 0 if wire == "float32" else a[applied] - sent[p][alive[p]]
        residuals.append(eps)
    return residuals


def gtopk_step(accs, k, wire="float32"):
    """Simulate one gTop-k step of P = len(accs) workers on their compensated gradients.

    Args:
        accs: list of P 1-D arrays of equal size d, acc^p = G^p + eps^p.
        k: entries kept per set, 0 <= k <= d (see :func:`gtopk_hvd.common.k_for`).
        wire: how values travel, "float32" or "float16" (Horovod's Compression.fp16): every
            set is rounded where it is sent (each rank's own top-k; the merged sets of stage
            1 on), merges add in float32; the rounding of a rank's own entries that were
            applied stays in its residual.

    Returns:
        :class:`StepResult` with the global set, the summed values and the new residuals.
    """
    accs, d = _check_accs(accs, k)
    size = len(accs)
    m, base, extra = world_split(size)

    local = [select_topk(a, k) for a in accs]
    sent = [to_wire(a[idx], wire) for idx, a in zip(local, accs)]
    sets = [SparseSet(idx, v) for idx, v in zip(local, sent)]
    alive = [np.ones(k, dtype=bool) for _ in range(size)]

    def survive(p, s):
        alive[p] &= np.isin(local[p], s.indices)

    # fold: extra rank e gives its set to e - P', which tracks e's alive flags from then on
    for e in range(base, size):
        b = e - base
        sets[b] = truncate(merge(sets[b], sets[e]), k)
        survive(b, sets[b])
        survive(e, sets[b])
    # stage s: swap with partner p ^ (1 << s), both keep the same k entries
    for s in range(m):
        for p in range(base):
            q = p ^ (1 << s)
            if p < q:
                low, high = sets[p], sets[q]
                if s > 0:  # sent as they stand (stage 0 holds own sets and folds of them)
                    low = SparseSet(low.indices, to_wire(low.values, wire))
                    high = SparseSet(high.indices, to_wire(high.values, wire))
                sets[p] = sets[q] = truncate(merge(low, high), k)
                for r in (p, q, p + base, q + base):
                    if r < size:
                        survive(r, sets[p])
    # unfold: the extra ranks get the final set (their alive flags are already tracked)
    final = sets[0]
    return StepResult(final.indices, final.values, _residuals(accs, local, alive, sent, wire),
                      local, alive)


def topk_allgather_step(accs, k, wire="float32"):
    """Simulate one Top-k S-SGD step: every rank's local top-k gathered from all and summed.

    Values are added in rank order (0 + v_0 + v_1 + ...), as the backends do.  Every sent entry
    counts, so each rank's residual is its acc with its own top-k cleared.
    """
    accs, d = _check_accs(accs, k)
    local = [select_topk(a, k) for a in accs]
    sent = [to_wire(a[idx], wire) for idx, a in zip(local, accs)]
    total = np.zeros(d, dtype=np.result_type(*accs))
    for idx, v in zip(local, sent):
        total[idx] += v
    indices = np.unique(np.concatenate(local)).astype(np.int64)
    alive = [np.ones(k, dtype=bool) for _ in accs]
    return StepResult(indices, total[indices], _residuals(accs, local, alive, sent, wire),
                      local, alive)


@dataclass
class HierarchicalResult:
    """Outcome of one simulated hierarchical step (:func:`hierarchical_step`).

    indices / values: the union S of the rails' global sets (global indices, sorted; summed
    values), the same on every rank.  shards: the (lo, hi) bounds of each local rank's shard.
    accs: per rank, its compensated shard (node sum + residual).  residuals: per rank, its new
    residual over its shard.  ks: k of each shard.
    """
    indices: np.ndarray
    values: np.ndarray
    shards: list
    accs: List[np.ndarray]
    residuals: List[np.ndarray]
    ks: list

    def dense(self, size, average_over=1):
        out = np.zeros(size, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out / average_over if average_over != 1 else out


def hierarchical_step(grads, residuals, local_size, density, wire="float32", joined=()):
    """Simulate one hierarchical gTop-k step (ALGORITHM.md, "Hierarchical gTop-k") of
    P = len(grads) ranks on N = P / L nodes of L = ``local_size`` ranks, node-contiguous
    (rank p is node p // L, local rank p % L, as Horovod numbers the ranks host by host).

    Args:
        grads: P 1-D arrays of size d, each rank's gradient buffer.
        residuals: P 1-D arrays, rank p's residual over its shard (shard p % L).
        local_size: L, ranks a node.
        density: rho; shard l keeps k_l = max(1, ceil(rho |shard l|)) entries a rail.
        wire: as :func:`gtopk_step`, for the exchange across nodes.
        joined: ranks that called ``join()``: their gradients are zeros (pass zeros) and
            their residual does not join their shard's sum, but the part of that sum (the
            other local ranks' gradients) that did not reach the result is added to it, so
            nothing is lost.

    The node sum of shard l adds the node's ranks in local-rank order (rank (n, 0) first), as
    the adapters do; each rail is :func:`gtopk_step` on the N compensated shards.
    """
    grads = [np.asarray(g) for g in grads]
    size = len(grads)
    if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1 \
            or size % local_size:
        raise ValueError(f"local_size must divide the {size} ranks, got {local_size!r}")
    d = grads[0].size
    for p, g in enumerate(grads):
        if g.ndim != 1 or g.size != d:
            raise ValueError(f"grads[{p}] must be 1-D of size {d}, got shape {g.shape}")
    shards = shard_bounds(d, local_size)
    nodes = size // local_size
    for p, eps in enumerate(residuals):
        lo, hi = shards[p % local_size]
        if np.asarray(eps).shape != (hi - lo,):
            raise ValueError(f"residuals[{p}] must cover shard {p % local_size} of {hi - lo} "
                             f"entries, got shape {np.asarray(eps).shape}")
    accs, new, ks = [None] * size, [None] * size, []
    indices, values = [], []
    for l, (lo, hi) in enumerate(shards):
        rail = [n * local_size + l for n in range(nodes)]
        for p in rail:  # 1-2: the node's sum on shard l, then this rank's residual
            node = range(p - l, p - l + local_size)
            total = grads[node[0]][lo:hi].copy()
            for q in node[1:]:
                total = total + grads[q][lo:hi]
            accs[p] = total if p in joined else total + np.asarray(residuals[p])
        k = k_for(hi - lo, density)
        ks.append(k)
        res = gtopk_step([accs[p] for p in rail], k, wire)  # 3 and 5, along the rail
        for p, eps in zip(rail, res.residuals):
            new[p] = eps + np.asarray(residuals[p]) if p in joined else eps
        indices.append(res.indices + lo)  # 4: the disjoint shards' sets, gathered
        values.append(res.values)
    dtype = np.result_type(*grads)
    return HierarchicalResult(np.concatenate(indices).astype(np.int64) if indices else
                              np.zeros(0, np.int64),
                              np.concatenate(values).astype(dtype) if values else
                              np.zeros(0, dtype), shards, accs, new, ks)
