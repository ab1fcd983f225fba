"""The optimizer-level reference: all P ranks of a gTop-k DistributedOptimizer, simulated.

Each rank runs this simulation on its own (every rank's batches come from seeds): the P
gradients are computed on a copy of the model, combined with
gtopk_hvd.common.reference.gtopk_step (or topk_allgather_step) buffer by buffer, and applied
with the same torch optimizer class, so a correct DistributedOptimizer matches it bit for bit.
"""
import copy

import numpy as np
import torch

from gtopk_hvd.common import as_schedule, k_for
from gtopk_hvd.common.buckets import make_buckets
from gtopk_hvd.common.reference import gtopk_step, topk_allgather_step


def flat32(tensor, numel):
    if tensor is None:
        return np.zeros(numel, np.float32)
    tensor = tensor.to_dense() if tensor.is_sparse else tensor
    return tensor.detach().reshape(-1).to(torch.float32).numpy()


class ReferenceRun:
    """Simulates P ranks; ``step(loss_for_rank)`` or ``apply(grads)`` advance it one step."""

    def __init__(self, model, make_optimizer, size, density, granularity="model",
                 algorithm="gtopk", dense_threshold=0, wire="float32", bucket_cap_mb=None):
        self.model = copy.deepcopy(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.model.parameters())
        self.size, self.algorithm, self.wire = size, algorithm, wire
        self.schedule = as_schedule(density)
        sparse = [i for i, p in enumerate(self.params) if p.numel() >= max(1, dense_threshold)]
        self.dense = [i for i, p in enumerate(self.params) if p.numel() < max(1, dense_threshold)]
        self.buffers = [sparse] if granularity == "model" else [[i] for i in sparse]
        if granularity == "bucket":  # the buckets' positions from the core's bucketing
            self.buffers = [[sparse[i] for i in bucket] for bucket in make_buckets(
                [self.params[i].numel() for i in sparse], bucket_cap_mb or 25)]
        self.eps = [[np.zeros(sum(self.params[i].numel() for i in buf), np.float32)
                     for _ in range(size)] for buf in self.buffers]
        self.steps = 0
        self.last_k = 0
        self.joined = set()  # ranks that called join(): zeros, residuals kept as they are

    def rank_grads(self, loss_for_rank, passes=1):
        """Every rank's gradients: ``loss_for_rank(model, rank, j)`` for j < passes, summed
        in p.grad as autograd accumulates them.  None where a rank has no gradient."""
        grads = []
        for rank in range(self.size):
            self.model.zero_grad(set_to_none=True)
            for j in range(passes):
                loss_for_rank(self.model, rank, j).backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in self.params])
        self.model.zero_grad(set_to_none=True)
        return grads

    def apply(self, grads):
        """One synchronisation on the P ranks' ``grads[rank][param]``, then the optimizer step."""
        self.combine(grads)
        self.opt.step()

    def combine(self, grads):
        """One synchronisation on the P ranks' ``grads[rank][param]``: p.grad of the model is
        the result, the residuals and the schedule step advance (no optimizer step)."""
        density = self.schedule(self.steps)
        combine = gtopk_step if self.algorithm == "gtopk" else topk_allgather_step
        self.last_k = 0
        for b, buf in enumerate(self.buffers):
            numels = [self.params[i].numel() for i in buf]
            accs = [np.zeros(int(sum(numels)), np.float32) if r in self.joined else
                    np.concatenate([flat32(grads[r][i], n) for i, n in zip(buf, numels)])
                    + self.eps[b][r] for r in range(self.size)]
            k = k_for(int(sum(numels)), density)
            res = combine(accs, k, wire=self.wire)
            self.eps[b] = [self.eps[b][r] if r in self.joined else res.residuals[r]
                           for r in range(self.size)]
            self.last_k += k
            update = res.dense(int(sum(numels)), average_over=self.size)
            offset = 0
            for i, n in zip(buf, numels):
                p = self.params[i]
                p.grad = torch.from_numpy(update[offset:offset + n].copy()).view_as(p).to(p.dtype)
                offset += n
        for i in self.dense:  # dense part: the float64 mean (the tests compare it with a tolerance)
            p = self.params[i]
            mean = np.mean([flat32(grads[r][i], p.numel()).astype(np.float64)
                            for r in range(self.size)], axis=0)
            p.grad = torch.from_numpy(mean.astype(np.float32)).view_as(p).to(p.dtype)
        self.steps += 1

    def step(self, loss_for_rank, passes=1):
        self.apply(self.rank_grads(loss_for_rank, passes))

    def residual(self, rank, buffer=0):
        return self.eps[buffer][rank]
