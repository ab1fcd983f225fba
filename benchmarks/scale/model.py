"""One training iteration of each method on a platform: SimGrid for every exchange, the
backward pass's timeline for the overlap of Horovod's dense allreduce.

- dense (Horovod): gradients become ready layer by layer, last layer first, as the backward
  pass (two thirds of the compute, spread over the layers by their FLOPs) goes; Horovod's
  background thread allreduces everything ready whenever it is idle, fused up to 64 MB
  (HOROVOD_FUSION_THRESHOLD's default); an allreduce of b bytes takes SimGrid's time of the
  ring on the platform (affine in b: every ring step moves b / P bytes over the same links,
  so two simulated sizes give the line) plus ``op_s``.
- topk / gtopk / hierarchical at the model granularity (gtopk_hvd's default): after the
  backward pass, one exchange of the whole model, simulated with its local work.
- auto: what ``algorithm="auto"`` chooses (gtopk_hvd.common.cost.buffer_methods) with the
  Link that gtopk_hvd.common.cost.measure_link would measure on the platform (alpha and beta
  fitted, with the library's fit_alpha_beta, to SimGrid's dense allreduce of 1 and 2^18
  entries, as measure_link does on a job; ``stage`` from a simulated one-entry gTop-k call),
  ``select`` and ``overhead`` from the local work.  When it chooses dense, the model's one
  buffer is allreduced after the backward pass (the library's step), not overlapped.
"""
from functools import lru_cache

from gtopk_hvd.common.cost import (Link, buffer_methods, dense_allreduce_cost, fit_alpha_beta,
                                   gtopk_stages)

from benchmarks.scale.layers import layers_of
from benchmarks.scale.programs import LocalWork, program
from benchmarks.scale.simulate import run_programs

__all__ = ["exchange_time", "dense_line", "iteration_time", "dense_after_backward", "auto_link",
           "FUSION_BYTES"]

FUSION_BYTES = 64 * 1024 * 1024
PROBE = 1 << 18  # entries of measure_link's large probe


@lru_cache(maxsize=None)
def exchange_time(platform, method, d, density, work):
    """Seconds of one call (slowest rank) of ``method`` on ``d`` entries, local work included."""
    programs = [program(method, d, density, platform.size, r, work, platform.ranks_per_node)
                for r in range(platform.size)]
    return max(run_programs(platform, programs))


@lru_cache(maxsize=None)
def dense_line(platform, work):
    """(seconds at 0 bytes, seconds per byte) of a dense allreduce, from two simulated sizes."""
    p = platform.size
    small, large = p, p * PROBE
    t_small = exchange_time(platform, "dense", small, 1.0, work)
    t_large = exchange_time(platform, "dense", large, 1.0, work)
    slope = (t_large - t_small) / (4.0 * (large - small))
    return t_small - slope * 4 * small, slope


def auto_link(platform, work):
    """The Link measure_link would find: alpha, beta fitted to the simulated dense allreduce
    of 1 and PROBE entries; ``stage``: a simulated gTop-k call of one entry (Horovod's cost
    per operation and the round trips) over its stages; select and overhead from ``work``."""
    p = platform.size
    base, per_byte = dense_line(platform, work)
    times = [base + per_byte * 4 * 1, base + per_byte * 4 * PROBE]
    alpha, beta = fit_alpha_beta([dense_allreduce_cost(1, p), dense_allreduce_cost(PROBE, p)],
                                 times)
    stage = 0.0
    if p > 1:
        rounds_only = LocalWork(0.0, 0.0, 0.0, 0.0, work.op_s)
        stage = exchange_time(platform, "gtopk", p, 1.0 / p, rounds_only) / gtopk_stages(p)
    return Link(alpha, beta, work.select + work.apply, work.fixed, stage)


def auto_choice(platform, d, density, work):
    return buffer_methods("auto", [d], density, platform.size, auto_link(platform, work))[0]


def _dense_wfbp(layers, forward, backward, platform, work):
    base, per_byte = dense_line(platform, work)
    flops = [f for _, f in layers]
    total = sum(flops) or 1.0
    ready, t = [], forward
    for entries, f in reversed(layers):  # backward: last layer first
        t += backward * f / total
        if entries:
            ready.append((t, 4 * entries))
    comm_free, i = 0.0, 0
    while i < len(ready):
        start = max(comm_free, ready[i][0])
        size = 0
        while i < len(ready) and ready[i][0] <= start and (size == 0 or
                                                           size + ready[i][1] <= FUSION_BYTES):
            size += ready[i][1]
            i += 1
        comm_free = start + base + per_byte * size
    return max(comm_free, forward + backward)


def dense_after_backward(d, compute_s, platform, work):
    """Seconds of an iteration whose ``d`` gradients are allreduced densely in one operation
    after the backward pass: what ``algorithm="auto"`` runs when it sends the model's one
    buffer densely (the step's dense allreduce; unlike Horovod's own, not overlapped)."""
    base, per_byte = dense_line(platform, work)
    return compute_s + base + per_byte * 4 * d


def iteration_time(model, compute_s, platform, method, density, work, exchange=exchange_time):
    """Seconds of one iteration of ``model`` whose forward and backward take ``compute_s`` on a
    rank, with ``method`` ('dense', 'topk', 'gtopk', 'hierarchical' or 'auto'); returns
    (seconds, the method that ran).  ``exchange(platform, method, d, density, work)``: the
    seconds of a sparse exchange (simulated by default)."""
    layers = layers_of(model)
    d = sum(e for e, _ in layers)
    if method == "auto":
        method = auto_choice(platform, d, density, work)
        if method == "dense" and platform.size > 1:
            return dense_after_backward(d, compute_s, platform, work), "dense"
    if method == "dense" or platform.size == 1:
        return _dense_wfbp(layers, compute_s / 3, 2 * compute_s / 3, platform, work), "dense"
    return compute_s + exchange(platform, method, d, density, work), method
