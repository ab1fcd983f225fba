"""Local work and Horovod's per-operation cost, fitted to this machine's measurements.

From benchmarks/results/collective.csv (bench_collective.py on the emulated cluster): the
library's own breakdown of each call (selection, merge, decompress, residual, other) gives the
per-entry costs of :class:`LocalWork` at each world size and density, robustly (medians of
ratios: the 2-core machine has outliers of seconds at P = 4 and 8).  Local work does not
depend on the network, so it is read from the rows being validated (their "exchange" column,
the communication, is not used); ``op_s``, Horovod's cost per operation, comes from the
10 Gbit/s rows only: the median of (measured exchange - SimGrid's network time) / operations.
So what the validation tests is the network model: SimGrid's time of the schedule plus the
per-operation cost fitted on another network.

For GPUs nothing here is measured: :data:`GPU_WORK` states its assumption.
"""
import csv
import statistics
from pathlib import Path

from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.schedule import stages_for

from benchmarks.scale.programs import LocalWork, horovod_ops, program
from benchmarks.scale.simulate import Platform, run_programs

__all__ = ["load_rows", "platform_of", "fit_local_work", "GPU_WORK", "RESULTS"]

RESULTS = Path(__file__).resolve().parents[1] / "results"

# GPU local work (assumption, not measured here): each pass over a buffer is bound by HBM2
# bandwidth (V100: 900 GB/s, NVIDIA's V100 datasheet) at half efficiency; compensation and
# selection read and write about 32 bytes an entry (gradient, residual, accumulator, a radix
# select's passes), the scatter and residual update 16; a merge 24 bytes an entry; 50 us of
# kernel launches a call and Horovod's negotiation of 1 ms a collective (its default cycle).
_HBM = 0.5 * 900e9
GPU_WORK = LocalWork(select=32 / _HBM, merge=24 / _HBM, apply=16 / _HBM, fixed=50e-6,
                     op_s=1e-3)


def load_rows(name="collective.csv", **match):
    with open(RESULTS / name) as f:
        return [r for r in csv.DictReader(f)
                if all(r.get(k) == str(v) for k, v in match.items())]


def platform_of(row):
    """The emulated cluster of a row: one rank a host, the measured rate and round trip (a
    message crosses two links, so a link's one-way latency is a quarter of the RTT)."""
    return Platform(int(row["P"]), 1, float(row["link_gbit"]), float(row["rtt_us"]) * 1e-6 / 4)


def _f(row, key):
    return float(row[key] or 0.0)


def fit_local_work(size, density, network="1gbit", setting="default", op_network="10gbit"):
    """:class:`LocalWork` for ``size`` ranks at ``density``: per-entry costs from the local
    parts of the ``network`` rows at that density (medians of ratios over the three sizes),
    ``op_s`` from the exchange times of the ``op_network`` rows (held out from validation)."""
    rows = [r for r in load_rows(P=size, network=network, setting=setting)
            if r["method"] in ("gtopk", "topk") and float(r["density"]) == density]
    if not rows:
        raise ValueError(f"no {network} rows at P = {size}, density {density} in collective.csv")
    select = statistics.median(_f(r, "selection_s") / int(r["d"]) for r in rows)
    apply_ = statistics.median((_f(r, "decompress_s") + _f(r, "residual_s") + _f(r, "other_s"))
                               / int(r["d"]) for r in rows)
    merges = [_f(r, "merge_s") / (k_for(int(r["d"]), density) * 2 * len(stages_for(0, size)))
              for r in rows if r["method"] == "gtopk" and size > 1]
    merge = statistics.median(merges) if merges else 0.0
    return LocalWork(select, merge, apply_, 0.0, op_cost(size, op_network, setting))


def op_cost(size, network="10gbit", setting="default"):
    """Horovod's cost per operation: the median over the ``network`` rows of (measured
    exchange - SimGrid's network time of the same call) / operations of the call."""
    over = []
    net = LocalWork(0.0, 0.0, 0.0)
    for r in load_rows(P=size, network=network, setting=setting):
        if r["method"] not in ("dense", "gtopk", "topk"):
            continue
        d, density = int(r["d"]), float(r["density"])
        t = max(run_programs(platform_of(r), [program(r["method"], d, density, size, q, net)
                                              for q in range(size)]))
        over.append((_f(r, "exchange_s") - t) / horovod_ops(r["method"], size))
    return max(0.0, statistics.median(over))
