"""All P ranks of several gTop-k synchronisations of a model, simulated with the NumPy
reference (gtopk_hvd.common.reference), for the TensorFlow training workers.

The workers drive training with a linear loss, sum(w * G), whose gradient is exactly G, so the
gradients of every rank at every step are known from seeds and each rank can compare what its
tape or optimizer produced with this simulation, bit for bit.
"""
import numpy as np

from gtopk_hvd.common import k_for
from gtopk_hvd.common.reference import gtopk_step, topk_allgather_step


def rank_grads(seed, step, rank, shapes, integer=False):
    """Rank ``rank``'s gradients (one float32 array per shape) at ``step`` of scenario ``seed``."""
    rng = np.random.default_rng([seed, step, rank])
    if integer:
        return [rng.integers(-4, 5, s).astype(np.float32) for s in shapes]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


class ReferenceModel:
    """P ranks' residuals, one reference synchronisation at a time.

    Args:
        shapes: the variables' shapes.
        density: a float, or a function of the step.
        granularity: "model" (one buffer) or "layer" (one per variable).
        dense_threshold: variables with fewer elements are averaged densely.
        algorithm: "gtopk" or "topk".
    """

    def __init__(self, shapes, size, density, granularity="model", dense_threshold=0,
                 algorithm="gtopk", wire="float32"):
        self.shapes, self.size = [tuple(s) for s in shapes], size
        self.density = density if callable(density) else (lambda step: density)
        self.granularity, self.algorithm, self.wire = granularity, algorithm, wire
        self.threshold = max(1, dense_threshold)
        self.numels = [int(np.prod(s)) for s in self.shapes]
        self.eps = [[np.zeros(n, np.float32) for n in self.numels] for _ in range(size)]
        self.step_count = 0

    def _exchange(self, accs, k):
        step = gtopk_step if self.algorithm == "gtopk" else topk_allgather_step
        return step(accs, k, wire=self.wire)

    def step(self, grads, joined=()):
        """grads[p][j]: rank p's gradient of variable j.  Returns the averaged gradients
        (the same for every rank), one array per variable, and advances the residuals.
        ``joined``: ranks that called join(): zeros, their residuals kept."""
        density = self.density(self.step_count)
        self.step_count += 1
        out = [None] * len(self.shapes)
        sparse = [j for j, n in enumerate(self.numels) if n >= self.threshold]
        dense = [j for j, n in enumerate(self.numels) if n < self.threshold]
        buffers = [sparse] if self.granularity == "model" and sparse else [[j] for j in sparse]
        for members in buffers:
            accs = [np.zeros(sum(self.numels[j] for j in members), np.float32) if p in joined
                    else np.concatenate([grads[p][j].reshape(-1) + self.eps[p][j]
                                         for j in members]) for p in range(self.size)]
            want = self._exchange(accs, k_for(accs[0].size, density))
            total = np.zeros(accs[0].size, np.float32)
            if self.algorithm == "gtopk":
                total[want.indices] = want.values
            else:
                total = want.dense(accs[0].size)
            total = total / self.size
            offsets = np.cumsum([0] + [self.numels[j] for j in members])
            for n, j in enumerate(members):
                out[j] = total[offsets[n]:offsets[n + 1]].reshape(self.shapes[j])
                for p in range(self.size):
                    if p not in joined:
                        self.eps[p][j] = want.residuals[p][offsets[n]:offsets[n + 1]]
        for j in dense:
            out[j] = np.sum([grads[p][j] for p in range(self.size)], axis=0) / self.size
        return out

    def residuals(self, rank):
        return [e.copy() for e in self.eps[rank]]
