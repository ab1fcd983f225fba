"""NumPy simulation of ``algorithm="auto"`` with ``hierarchical=True`` on all P ranks, shared
by the PyTorch and TensorFlow workers: per step each buffer runs dense, flat gTop-k or
hierarchical gTop-k, and a buffer whose mode changes moves this rank's residual first, as the
adapters do (gtopk_hvd.torch.state.GTopkState.reshard, gtopk_hvd.tensorflow.state.GTopkState.
settle_modes): to hierarchical, the rank's shard of its whole-buffer residual joins its shard
residual and the rest is carried into the next applied step's gradients; back to flat, shard
and carry return to the whole-buffer residual.  Entries move, nothing is summed across ranks.
"""
import numpy as np

from gtopk_hvd.common.cost import Link, buffer_methods
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.reference import gtopk_step, hierarchical_step


class AutoHierarchicalReference:
    """P ranks' residuals of buffers of ``numels`` entries on nodes of ``local`` ranks: per
    rank and buffer the whole-buffer residual (``flat``), the shard residual (``shard``) and
    the carry (``carry``)."""

    def __init__(self, numels, size, local):
        self.numels, self.size, self.local = list(numels), size, local
        self.flat = [[np.zeros(n, np.float32) for n in numels] for _ in range(size)]
        self.carry = [[np.zeros(n, np.float32) for n in numels] for _ in range(size)]
        self.shard = [[np.zeros(self._bounds(n, p)[1] - self._bounds(n, p)[0], np.float32)
                       for n in numels] for p in range(size)]
        self.modes = [None] * len(numels)  # hierarchical or not, per buffer

    def _bounds(self, numel, rank):
        return shard_bounds(numel, self.local)[rank % self.local]

    def _move(self, j, hierarchical):
        n = self.numels[j]
        for p in range(self.size):
            lo, hi = self._bounds(n, p)
            whole = self.flat[p][j] + self.carry[p][j]
            if hierarchical:
                self.shard[p][j] = self.shard[p][j] + whole[lo:hi]
                self.carry[p][j], self.flat[p][j] = whole.copy(), np.zeros(n, np.float32)
                self.carry[p][j][lo:hi] = 0
            else:
                self.flat[p][j] = whole + np.pad(self.shard[p][j], (lo, n - hi))
                self.shard[p][j] = np.zeros(hi - lo, np.float32)
                self.carry[p][j] = np.zeros(n, np.float32)
        self.modes[j] = hierarchical

    def step(self, grads, methods, density):
        """grads[p][j]: rank p's flat float32 gradient of buffer j; methods[j]: 'dense',
        'gtopk' (flat) or 'hierarchical'.  Returns the averaged gradient of each buffer."""
        out = []
        for j, (n, method) in enumerate(zip(self.numels, methods)):
            hierarchical = method == "hierarchical"
            if self.modes[j] != hierarchical:
                self._move(j, hierarchical)
            ranks = range(self.size)
            if hierarchical:
                res = hierarchical_step([grads[p][j] + self.carry[p][j] for p in ranks],
                                        [self.shard[p][j] for p in ranks], self.local, density)
                for p in ranks:
                    self.shard[p][j], self.carry[p][j] = res.residuals[p], np.zeros(n, np.float32)
                out.append(res.dense(n, average_over=self.size))
                continue
            accs = [grads[p][j] + self.flat[p][j] for p in ranks]
            if method == "dense":  # the whole residual is applied; the sum times 1/P in float32
                out.append(np.sum(accs, axis=0) * np.float32(1.0 / self.size))
                self.flat = [[np.zeros(m, np.float32) if i == j else e
                              for i, (e, m) in enumerate(zip(row, self.numels))]
                             for row in self.flat]
                continue
            want = gtopk_step(accs, k_for(n, density))
            total = np.zeros(n, np.float32)
            total[want.indices] = want.values
            out.append(total / self.size)
            for p in ranks:
                self.flat[p][j] = want.residuals[p]
        return out


# (densities by step, link): a large and a small buffer, both hierarchical at the low density
# and the small one dense at the high one, on some layouts (the cost model's crossovers move
# with the world size); integer gradients keep the dense sums exact
MIXED_NUMELS = [4000, 30]
MIXED_CASES = [([0.05, 0.3, 0.05, 0.3], Link(0.0, 1e-5, 1e-6, 1e-4, intra_alpha=0.0,
                                                intra_beta=1e-12)),
               ([0.05, 0.2, 0.05, 0.2], Link(0.0, 1e-4, 1e-8, 3e-4, intra_alpha=0.0,
                                                intra_beta=1e-12))]


def mixed_case(size, nodes, dense_paid):
    """(densities, link, whether a step mixes dense and hierarchical buffers) for a job of
    ``size`` ranks on ``nodes`` (N, L), or None where it runs flat: the first case of
    MIXED_CASES that mixes them on this layout, else the first."""
    for densities, link in MIXED_CASES:
        methods = [buffer_methods("auto", MIXED_NUMELS, d, size, link, dense_paid=dense_paid,
                                  nodes=nodes) for d in densities[:2]]
        if methods == [("hierarchical", "hierarchical"), ("hierarchical", "dense")]:
            return densities, link, True
    return (*MIXED_CASES[0], False)
