"""Benchmark of one sparse allreduce: dense Horovod allreduce vs Top-k by allgather vs gTop-k.

For every network (1 Gbit/s, 10 Gbit/s, unshaped veths), world size P and gradient size d, each
rank of an emulated cluster (benchmarks/cluster.py) calls, on a random float32 gradient:

- ``hvd.allreduce_`` (dense ring allreduce, the baseline);
- ``gtopk_allreduce_(..., algorithm="topk")``: every rank's top-k gathered by one allgather;
- ``gtopk_allreduce_(..., algorithm="gtopk")``: the log2 P hypercube of merge-and-truncate;
- ``auto`` (``--methods ...,auto``): what ``algorithm="auto"`` of the optimizers would send
  this tensor by (gtopk_hvd.common.cost.buffer_methods on a link measured once per job with
  ``measure_link()``), i.e. the dense allreduce or gTop-k, timed the same way; the table
  says what it chose;

(all three in place, as an optimizer uses them: no gradient-sized output is allocated per
call)
and records the median time per call (the slowest rank of each call), the per-phase
breakdown of the library's ``profile=True`` timings (selection, exchange, merge, decompress,
residual; 'other' is the compensation add and Python overhead), and the bytes its interface
really sent per call (/sys/class/net/eth0/statistics inside its namespace, not computed).
The alpha-beta model of ALGORITHM.md (gtopk_hvd.common.cost) is fitted per network to the
communication times (dense: whole call; Top-k / gTop-k: exchange phase).

Also (``--selection``, one process, no cluster): the local top-k selection on a 25M gradient
against one ``acc.abs()`` pass.

    python benchmarks/bench_collective.py --quick      # the target configurations, ~5 min
    python benchmarks/bench_collective.py              # the whole sweep (long on 2 cores)
    python benchmarks/bench_collective.py --plot-only  # redo CSV summary and plots

Writes benchmarks/results/collective.csv, collective_*.png, selection.csv and
collective.md.  Rows are merged by (network, P, d, density, method), so subsets can be run
one after the other.  Repetitions are kept small (default 5, 3 with --quick): 8 ranks share
2 cores, so compute phases are slower than on real hosts and timings are noisy.
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, SETTINGS, WireCounter, load_config,  # noqa: E402
                               markdown_table, median, merge_rows, read_csv, run_workers,
                               save_result, setup_logging, wait_for_quiet, worker_env,
                               write_csv)
from gtopk_hvd.common.cost import buffer_methods, cost_of, fit_alpha_beta  # noqa: E402
from gtopk_hvd.common.density import k_for  # noqa: E402

logger = logging.getLogger("gtopk_bench.collective")

PHASES = ("selection", "exchange", "merge", "decompress", "residual", "other")
KEY = ("setting", "network", "P", "d", "density", "method")
CSV_PATH = RESULTS / "collective.csv"
PROTO_PATH = RESULTS / "protocol.csv"


# ---------------------------------------------------------------------------------------------
# worker (runs on every rank)

def _barrier_bytes(hvd, counter, n=20):
    """Bytes one hvd.barrier() puts on this rank's interface (to subtract from the blocks)."""
    hvd.barrier()
    counter.start()
    for _ in range(n):
        hvd.barrier()
    return counter.delta()[0] / n


def _idle_bytes_per_s(hvd, counter, seconds=1.0):
    """Horovod's background coordination traffic while no op runs."""
    hvd.barrier()
    counter.start()
    time.sleep(seconds)
    tx = counter.delta()[0]
    hvd.barrier()
    return tx / seconds


def _pair_allgather(hvd, counter, k, barrier_tx, n=30):
    """Bytes and seconds per back-to-back allgather of k (value, index) rows in this rank's
    stage-0 pair set: one gTop-k stage's message without any computation around it, so the
    difference to 8k bytes is the per-message protocol overhead (TCP/IP headers, Horovod's
    negotiation), not the background coordination that runs during a long call."""
    import torch
    from gtopk_hvd.common.process_sets import exchange_sets
    rank, size = hvd.rank(), hvd.size()
    partner = rank ^ 1 if (rank ^ 1) < size else None
    sets = exchange_sets(hvd)
    rows = torch.zeros(k, 2, dtype=torch.int32)
    ps = sets.get((min(rank, rank ^ 1), max(rank, rank ^ 1))) if partner is not None else None
    if ps is not None:
        for _ in range(3):  # warm-up: Horovod's response cache learns the op
            hvd.allgather(rows, name=f"protocol.{k}", process_set=ps)
    hvd.barrier()
    counter.start()
    t0 = time.perf_counter()
    if ps is not None:
        for _ in range(n):
            hvd.allgather(rows, name=f"protocol.{k}", process_set=ps)
    dt = time.perf_counter() - t0
    hvd.barrier()
    tx = counter.delta()[0] - barrier_tx
    return {"k": k, "payload_bytes": 8 * k, "tx_bytes_per_op": tx / n, "s_per_op": dt / n,
            "rank": rank}


def worker():
    cfg, out = load_config()
    import horovod.torch as hvd
    import torch

    torch.set_num_threads(1)
    import gtopk_hvd.torch as gtopk
    gtopk.init()
    rank, size = hvd.rank(), hvd.size()
    counter = WireCounter()
    barrier_tx = _barrier_bytes(hvd, counter)
    idle_tx_rate = _idle_bytes_per_s(hvd, counter)
    protocol = [_pair_allgather(hvd, counter, k, barrier_tx)
                for k in cfg.get("protocol_k", [])]
    protocol = hvd.allgather_object(protocol, name="gather.protocol")
    # algorithm="auto": the link measured once, as the optimizers do after their first step
    link = gtopk.measure_link("bench.link") if "auto" in cfg["methods"] else None
    rows = []
    for d in cfg["sizes"]:
        g0 = torch.randn(d, generator=torch.Generator().manual_seed(1000 + rank))
        g = g0.clone()
        cases = [(m, rho) for m in cfg["methods"] for rho in
                 ([1.0] if m == "dense" else cfg["densities"])]
        for method, density in cases:
            state = {"residual": None}
            name = f"{method}.{d}.{density}"
            sends = buffer_methods("auto", [d], density, size, link)[0] if method == "auto" \
                else method

            def call():
                # in place, both: hvd.allreduce_ / gtopk_allreduce_ write the result into g
                # (a fresh 100 MB output tensor per call costs more than a pass over it)
                if sends == "dense":
                    hvd.allreduce_(g, op=hvd.Average, name=name)
                    return {}
                res = gtopk.gtopk_allreduce_(g, density=density, name=name, algorithm=sends,
                                             residual=state["residual"], profile=True)
                state["residual"] = res.residual
                return res.timings

            for _ in range(cfg["warmup"]):
                g.copy_(g0)
                call()
            reps = cfg["reps"] if not (sends == "dense" and d >= 10_000_000) \
                else cfg["reps_dense_large"]
            hvd.barrier()
            counter.start()
            t_block = time.perf_counter()
            times, phases = [], []
            for _ in range(reps):
                g.copy_(g0)  # the same input every call, outside the timed region
                hvd.barrier()
                t0 = time.perf_counter()
                timings = call()
                times.append(time.perf_counter() - t0)
                phases.append(timings)
            hvd.barrier()
            block_s = time.perf_counter() - t_block
            tx, rx = counter.delta()
            mine = {"times": times,
                    "phases": {p: median([t.get(p, 0.0) for t in phases]) for p in PHASES[:-1]},
                    "tx": (tx - (reps + 1) * barrier_tx) / reps, "rx": rx / reps,
                    "block_s": block_s, "reps": reps}
            everyone = hvd.allgather_object(mine, name=f"gather.{name}")
            if rank == 0:
                rows.append(_summarise(everyone, method, d, density, size, cfg, barrier_tx,
                                       idle_tx_rate))
                if method == "auto":
                    rows[-1].update(chose=sends, **{f"link_{key}": value for key, value
                                                    in vars(link).items()})
                    if sends == "dense":  # the whole call is the exchange
                        rows[-1].update(exchange_s=rows[-1]["time_s"], other_s=0.0)
                logger.info("P=%d d=%d %s rho=%g: %.4f s", size, d, method, density,
                            rows[-1]["time_s"])
    if rank == 0:
        proto_rows = []
        for i, k in enumerate(cfg.get("protocol_k", [])):
            per_rank = [p[i] for p in protocol]
            proto_rows.append({"k": k, "P": size, "payload_bytes": 8 * k,
                               "tx_bytes_per_op": median([p["tx_bytes_per_op"] for p in per_rank]),
                               "s_per_op": median([p["s_per_op"] for p in per_rank])})
        save_result(out, {"rows": rows, "barrier_tx_bytes": barrier_tx,
                          "idle_tx_bytes_per_s": idle_tx_rate, "protocol": proto_rows})
    hvd.barrier()


def _summarise(everyone, method, d, density, size, cfg, barrier_tx, idle_tx_rate):
    reps = everyone[0]["reps"]
    per_call = [max(r["times"][i] for r in everyone) for i in range(reps)]  # slowest rank
    phases = {p: sum(r["phases"][p] for r in everyone) / len(everyone) for p in PHASES[:-1]}
    if method == "dense":
        phases["exchange"] = median(per_call)
    time_s = median(per_call)
    phases["other"] = max(0.0, time_s - sum(phases[p] for p in PHASES[:-1]))
    txs = [r["tx"] for r in everyone]
    return {"method": method, "d": d, "density": density if method != "dense" else 1.0,
            "k": k_for(d, density) if method != "dense" else d, "P": size, "reps": reps,
            "time_s": time_s, "time_min_s": min(per_call),
            **{f"{p}_s": phases[p] for p in PHASES},
            "tx_bytes_mean": sum(txs) / len(txs), "tx_bytes_max": max(txs),
            "rx_bytes_mean": sum(r["rx"] for r in everyone) / len(everyone),
            "idle_tx_bytes_per_s": idle_tx_rate, "barrier_tx_bytes": barrier_tx}


# ---------------------------------------------------------------------------------------------
# selection against one pass of abs() (local, one process)

def selection_bench(d=25_000_000, densities=(0.001, 0.01), reps=7, threads=(1, 2)):
    """Best-of-``reps`` times of select_topk, torch.topk(|acc|) and one acc.abs() pass.

    acc.abs() allocates its output like the selection does; ``abs_out_s`` is the same pass
    into a preallocated buffer (no page faults): the pure memory-bound arithmetic.
    """
    import torch
    from gtopk_hvd.torch.ops import select_topk

    rows = []
    acc = torch.randn(d, generator=torch.Generator().manual_seed(0))
    buf = torch.empty_like(acc)
    for nt in threads:
        torch.set_num_threads(nt)

        def timeit(fn):
            # the minimum of a few runs: the other processes on these 2 cores only add time
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        t_abs = timeit(lambda: acc.abs())
        t_abs_out = timeit(lambda: torch.abs(acc, out=buf))
        for rho in densities:
            k = k_for(d, rho)
            t_sel = timeit(lambda: select_topk(acc, k))
            t_topk = timeit(lambda: torch.topk(acc.abs(), k, sorted=False))
            rows.append({"d": d, "density": rho, "k": k, "threads": nt, "abs_s": t_abs,
                         "abs_out_s": t_abs_out, "select_topk_s": t_sel, "torch_topk_s": t_topk,
                         "ratio_select_over_abs": t_sel / t_abs,
                         "ratio_select_over_abs_out": t_sel / t_abs_out,
                         "ratio_torch_topk_over_abs": t_topk / t_abs})
    return rows


def run_selection(settings):
    """selection_bench in a fresh interpreter per setting (allocator tunables act at start)."""
    import json
    import os
    import subprocess
    rows = []
    for setting in settings:
        env = {**os.environ, **worker_env(), **SETTINGS[setting]}
        env.pop("OMP_NUM_THREADS", None)
        out = subprocess.run([sys.executable, __file__, "--selection-worker"], env=env,
                             capture_output=True, text=True, check=True, timeout=600)
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            r["setting"] = setting
            rows.append(r)
            logger.info("selection [%s] rho=%g threads=%d: abs %.1f ms (into a buffer %.1f ms), "
                        "select_topk %.1f ms = %.2fx abs, torch.topk(abs) %.1f ms", setting,
                        r["density"], r["threads"], r["abs_s"] * 1e3, r["abs_out_s"] * 1e3,
                        r["select_topk_s"] * 1e3, r["ratio_select_over_abs"],
                        r["torch_topk_s"] * 1e3)
    return rows


# ---------------------------------------------------------------------------------------------
# launcher

def _merge(old, new):
    rows = merge_rows(old, new, KEY)
    return sorted(rows, key=lambda r: (r["setting"], r["network"], r["P"], r["d"],
                                       -r["density"], r["method"]))


def _sent_by(r):
    """The method a row's tensor was sent by (``auto`` rows: what it chose)."""
    return r.get("chose") or r["method"]


def _comm_time(r):
    return r["time_s"] if _sent_by(r) == "dense" else r["exchange_s"]


def add_model(rows):
    """Fit alpha, beta per network to the communication times; add model columns."""
    fits = {}
    for group in sorted({(r["setting"], r["network"]) for r in rows}):
        sel = [r for r in rows if (r["setting"], r["network"]) == group and r["P"] > 1
               and _comm_time(r) > 0]
        costs = [cost_of(_sent_by(r), r["d"], r["density"], r["P"]) for r in sel]
        if len(sel) >= 2:
            fits[group] = fit_alpha_beta(costs, [_comm_time(r) for r in sel])
    for r in rows:
        c = cost_of(_sent_by(r), r["d"], r["density"], r["P"])
        alpha, beta = fits.get((r["setting"], r["network"]), (float("nan"), float("nan")))
        r.update(model_bytes=c.bytes, model_comm_s=c.time(alpha, beta), alpha_s=alpha,
                 beta_s_per_byte=beta, comm_s=_comm_time(r),
                 bytes_over_model=r["tx_bytes_mean"] / c.bytes if c.bytes else float("nan"))
    return fits


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(rows, selection_rows, setting):
    """The issue's targets for one setting as (name, measured, goal) rows."""
    rows = [r for r in rows if r["setting"] == setting]
    out = []

    def ratio(num, den):
        return num["time_s"] / den["time_s"] if num and den else float("nan")

    for p, rho in ((4, 0.001), (8, 0.001)):
        g = _find(rows, network="1gbit", P=p, d=25_000_000, density=rho, method="gtopk")
        dn = _find(rows, network="1gbit", P=p, d=25_000_000, method="dense")
        t = _find(rows, network="1gbit", P=p, d=25_000_000, density=rho, method="topk")
        if p == 4:
            out.append((f"dense / gTop-k time, d=25M, rho={rho:g}, P={p}, 1 Gbit/s",
                        ratio(dn, g), ">= 10"))
        else:
            out.append((f"Top-k / gTop-k time, d=25M, rho={rho:g}, P={p}, 1 Gbit/s",
                        ratio(t, g), ">= 1.5"))
    netns = [r for r in rows if r["method"] == "gtopk" and r["network"] != "loopback"
             and r["P"] > 1 and not math.isnan(r.get("bytes_over_model", float("nan")))]
    for r in sorted(netns, key=lambda r: (r["network"], r["P"], r["d"], r["density"])):
        if r["k"] >= 25_000 and r["network"] == "1gbit":
            out.append((f"gTop-k tx bytes / (8k log2 P), k={r['k']}, P={r['P']}, "
                        f"{r['network']}", r["bytes_over_model"], "<= 1.15"))
    if netns:
        worst = max(netns, key=lambda r: r["bytes_over_model"])
        out.append((f"gTop-k tx bytes / (8k log2 P), worst of all {len(netns)} rows "
                    f"(k={worst['k']}, P={worst['P']}, {worst['network']})",
                    worst["bytes_over_model"], "<= 1.15"))
    autos = []  # auto against the best fixed method and against dense, same tensor
    for r in (r for r in rows if r["method"] == "auto"):
        same = dict(network=r["network"], P=r["P"], d=r["d"])
        fixed = [f for f in (_find(rows, **same, method="dense"),
                             _find(rows, **same, density=r["density"], method="gtopk"),
                             _find(rows, **same, density=r["density"], method="topk")) if f]
        if fixed and fixed[0]["method"] == "dense":
            autos.append((r, ratio(r, min(fixed, key=lambda f: f["time_s"])),
                          ratio(r, fixed[0])))
    for label, pos, goal in (("best fixed method", 1, "<= 1.1"), ("dense", 2, "<= 1.0")):
        if autos:
            worst = max(autos, key=lambda a: a[pos])
            r = worst[0]
            out.append((f"auto / {label}, worst of {len(autos)} rows (d={r['d'] / 1e6:g}M, "
                        f"rho={r['density']:g}, P={r['P']}, {r['network']}, chose "
                        f"{r['chose']})", worst[pos], goal))
    for r in selection_rows:
        if r.get("setting") == setting and r["threads"] == 1 and r["density"] == 0.001:
            out.append(("select_topk / one acc.abs(), d=25M, rho=0.001, 1 thread",
                        r["ratio_select_over_abs"], "<= 3"))
            out.append(("select_topk / one abs() into a preallocated buffer (stricter)",
                        r["ratio_select_over_abs_out"], "<= 3"))
    return out


def plot(rows, path_prefix):
    rows = [r for r in rows if r["method"] != "auto"]  # the fixed methods; auto: the table
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "k", "topk": "tab:orange", "gtopk": "tab:blue"}
    settings = sorted({r["setting"] for r in rows}, key=lambda s: (s != "default", s))
    groups = [(s, n) for s in settings for n in ("1gbit", "10gbit", "unshaped", "loopback",
                                                 "hosts")
              if any(r["setting"] == s and r["network"] == n for r in rows)]
    procs = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(len(groups), len(procs),
                             figsize=(4.2 * len(procs), 3.3 * len(groups)), squeeze=False)
    for i, (setting, net) in enumerate(groups):
        for j, p in enumerate(procs):
            ax = axes[i][j]
            sel = [r for r in rows if r["setting"] == setting and r["network"] == net
                   and r["P"] == p]
            for method, rho in sorted({(r["method"], r["density"]) for r in sel}):
                pts = sorted((r["d"], r["time_s"], r["model_comm_s"]) for r in sel
                             if r["method"] == method and r["density"] == rho)
                label = "dense" if method == "dense" else f"{method} rho={rho:g}"
                ls = "-" if method == "dense" or rho >= 0.01 else "--"
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], color=colors[method],
                        marker="o", ms=3, ls=ls, label=label)
                ax.plot([x for x, _, _ in pts], [m for _, _, m in pts], color=colors[method],
                        ls=":", alpha=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{net} ({setting}), P={p}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("median s per call")
            ax.set_xlabel("d (float32 values)", fontsize=8)
            if sel:
                ax.legend(fontsize=6)
    fig.suptitle("time per call; dotted: fitted alpha-beta model of the communication",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_time.png", dpi=100)
    plt.close(fig)

    # breakdown at d = 25M (or the largest), the smallest density, 1gbit if present
    bars = []
    for setting, net in groups:
        sel = [r for r in rows if r["setting"] == setting and r["network"] == net]
        dmax = max(r["d"] for r in sel)
        rmin = min(r["density"] for r in sel)
        bars += [r for r in sel if r["d"] == dmax and r["density"] in (1.0, rmin)]
        if bars:
            break
    bars.sort(key=lambda r: (r["setting"], r["P"], ["dense", "topk", "gtopk"].index(r["method"])))
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
        bottom = [0.0] * len(bars)
        for phase, color in zip(PHASES, ("tab:green", "tab:blue", "tab:purple", "tab:gray",
                                         "tab:olive", "lightgray")):
            vals = [r[f"{phase}_s"] for r in bars]
            ax.bar(range(len(bars)), vals, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([f"{r['method']}\nP={r['P']}" for r in bars], fontsize=8)
        ax.set_ylabel("seconds per call")
        ax.set_title(f"breakdown, {bars[0]['network']} ({bars[0]['setting']}), "
                     f"d={bars[0]['d'] / 1e6:g}M, rho={min(r['density'] for r in bars):g}",
                     fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_breakdown.png", dpi=100)
        plt.close(fig)

    # measured wire bytes against the model
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for method in ("dense", "topk", "gtopk"):
        sel = [r for r in rows if r["method"] == method and r["network"] != "loopback"
               and not math.isnan(r["tx_bytes_mean"])]
        ax.scatter([r["model_bytes"] for r in sel], [r["tx_bytes_mean"] for r in sel], s=12,
                   color=colors[method], label=method)
    lim = [1e3, 1e9]
    ax.plot(lim, lim, "k:", lw=1)
    ax.plot(lim, [x * 1.15 for x in lim], "r:", lw=0.8, label="model +15%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model: bytes sent per rank per call")
    ax.set_ylabel("measured: tx bytes per rank per call")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_bytes.png", dpi=100)
    plt.close(fig)


def report(rows, fits, selection_rows, proto=()):
    cols = [("setting", "setting", ""), ("network", "network", ""), ("P", "P", "d"),
            ("d", lambda r: f"{r['d'] / 1e6:g}M", ""),
            ("rho", lambda r: "-" if r["method"] == "dense" else f"{r['density']:g}", ""),
            ("method", "method", ""), ("median s", "time_s", ".4f"),
            ("select", "selection_s", ".4f"), ("exchange", "exchange_s", ".4f"),
            ("merge", "merge_s", ".4f"),
            ("decomp+resid", lambda r: r["decompress_s"] + r["residual_s"], ".4f"),
            ("other", "other_s", ".4f"), ("model comm", "model_comm_s", ".4f"),
            ("tx B/rank", "tx_bytes_mean", ".4g"), ("model B", "model_bytes", ".4g"),
            ("tx/model", "bytes_over_model", ".3f"),
            ("auto chose", lambda r: r.get("chose") or "", "")]
    lines = ["## Collective, per call", "", markdown_table(rows, cols), "",
             "Alpha-beta fit per (setting, network), on the communication times (dense: the "
             "whole call; Top-k / gTop-k: the exchange phase):", ""]
    for (setting, net), (a, b) in fits.items():
        lines.append(f"- {setting}, {net}: alpha = {a * 1e6:.1f} us, beta = {b * 1e9:.3f} ns/B"
                     f" ({8 / b / 1e9 if b else float('inf'):.2f} Gbit/s effective)")
    links = {(r["setting"], r["network"], r["P"]): r for r in rows}
    lines += ["", "Links as measured before each run (one TCP stream h0 -> h1), Horovod's "
              "idle coordination traffic and the barrier bytes subtracted:", "",
              markdown_table(sorted(links.values(), key=lambda r: (r["setting"], r["network"],
                                                                   r["P"])), [
                  ("setting", "setting", ""), ("network", "network", ""), ("P", "P", "d"),
                  ("link Gbit/s", "link_gbit", ".3f"), ("RTT us", "rtt_us", ".0f"),
                  ("TCP/IP bytes overhead", "tcp_overhead", ".4f"),
                  ("idle tx B/s per rank", "idle_tx_bytes_per_s", ".3g"),
                  ("barrier tx B", "barrier_tx_bytes", ".0f")])]
    if proto:
        lines += ["", "Protocol overhead of one exchange message alone: back-to-back allgathers "
                  "of k (value, index) rows in a two-rank process set, no computation around "
                  "them (tx bytes per op, median over ranks):", "",
                  markdown_table(proto, [
                      ("setting", "setting", ""), ("network", "network", ""), ("P", "P", "d"),
                      ("k", "k", "d"), ("payload B", "payload_bytes", "d"),
                      ("tx B per op", "tx_bytes_per_op", ".0f"),
                      ("overhead", "overhead", "+.1%"),
                      ("ms per op", lambda r: r["s_per_op"] * 1e3, ".2f")])]
    if selection_rows:
        lines += ["", "## Local selection, d = 25M (one process)", "",
                  markdown_table(selection_rows, [
                      ("setting", "setting", ""), ("threads", "threads", "d"),
                      ("rho", "density", "g"), ("k", "k", "d"),
                      ("abs() ms", lambda r: r["abs_s"] * 1e3, ".1f"),
                      ("abs(out=) ms", lambda r: r["abs_out_s"] * 1e3, ".1f"),
                      ("select_topk ms", lambda r: r["select_topk_s"] * 1e3, ".1f"),
                      ("select/abs", "ratio_select_over_abs", ".2f"),
                      ("select/abs(out=)", "ratio_select_over_abs_out", ".2f"),
                      ("torch.topk(abs) ms", lambda r: r["torch_topk_s"] * 1e3, ".1f")])]
    for setting in sorted({r["setting"] for r in rows} | {r.get("setting") for r in
                                                           selection_rows} - {None}):
        lines += ["", f"## Targets ({setting})", "", "| target | measured | goal |",
                  "| --- | --- | --- |"]
        for name, value, goal in targets(rows, selection_rows, setting):
            lines.append(f"| {name} | {value:.3g} | {goal} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the target configurations: 1gbit, P=4 and 8, d=25M, "
                             "rho=0.001, 5 reps (3 for dense); plus the selection benchmark")
    parser.add_argument("--networks", default="1gbit,10gbit,unshaped")
    parser.add_argument("--procs", default="2,4,8")
    parser.add_argument("--sizes", default="1000000,4000000,25000000")
    parser.add_argument("--densities", default="0.01,0.001")
    parser.add_argument("--methods", default="dense,topk,gtopk")
    parser.add_argument("--settings", default="default",
                        help="comma-separated: default (Horovod / glibc defaults), tuned "
                             "(HOROVOD_CYCLE_TIME=5, malloc huge pages)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reps-dense-large", type=int, default=3,
                        help="repetitions of the dense allreduce for d >= 10M")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mode", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--quiet-timeout", type=float, default=900,
                        help="wait up to this many seconds for other work to leave the CPUs "
                             "idle before each cluster run (0: do not wait)")
    parser.add_argument("--selection", action="store_true", help="run the selection benchmark")
    parser.add_argument("--no-collective", action="store_true",
                        help="skip the cluster runs (with --selection: only the selection)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="discard earlier rows in the CSV")
    args = parser.parse_args()
    setup_logging()
    if args.quick:
        args.networks, args.procs, args.sizes = "1gbit", "4,8", "25000000"
        args.densities, args.selection = "0.001", True
    settings = args.settings.split(",")
    sel_path = RESULTS / "selection.csv"
    rows = [] if args.fresh else read_csv(CSV_PATH)
    selection_rows = read_csv(sel_path)
    proto = read_csv(PROTO_PATH)
    if not args.plot_only:
        if args.selection:
            if args.quiet_timeout:
                wait_for_quiet(timeout=args.quiet_timeout)
            fresh = run_selection(settings)
            selection_rows = [r for r in selection_rows if r["setting"] not in settings] + fresh
            write_csv(sel_path, selection_rows)
        for setting in [] if args.no_collective else settings:
            for net in args.networks.split(","):
                for p in map(int, args.procs.split(",")):
                    cfg = {"sizes": [int(x) for x in args.sizes.split(",")],
                           "densities": [float(x) for x in args.densities.split(",")],
                           "methods": args.methods.split(","), "reps": args.reps,
                           "reps_dense_large": min(args.reps, args.reps_dense_large),
                           "warmup": args.warmup, "protocol_k": [1000, 25000]}
                    result, info = run_workers(__file__, p, net, cfg, mode=args.mode,
                                               env=SETTINGS[setting],
                                               quiet_timeout=args.quiet_timeout)
                    network = net if info["label"] not in ("loopback", "hosts") else info["label"]
                    for r in result["rows"]:
                        r.update(setting=setting, network=network, label=info["label"],
                                 link_gbit=info.get("link_gbit", float("nan")),
                                 rtt_us=info.get("rtt_us", float("nan")),
                                 tcp_overhead=info.get("tcp_overhead", float("nan")),
                                 foreign_cpu=info["foreign_cpu"],
                                 delay_emulated=info["delay_emulated"])
                    logger.info("%s [%s] P=%d done in %.0f s", info["label"], setting, p,
                                info["wall_s"])
                    rows = _merge(rows, result["rows"])
                    for r in result.get("protocol", []):
                        r.update(setting=setting, network=network,
                                 overhead=r["tx_bytes_per_op"] / r["payload_bytes"] - 1)
                    proto = merge_rows(proto, result.get("protocol", []),
                                       ("setting", "network", "P", "k"))
                    write_csv(PROTO_PATH, proto)
                    add_model(rows)
                    write_csv(CSV_PATH, rows)  # after every cluster: a crash keeps what ran
    fits = add_model(rows)
    if rows:
        write_csv(CSV_PATH, rows)
        plot(rows, str(RESULTS / "collective"))
    text = report(rows, fits, selection_rows, proto)
    (RESULTS / "collective.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        setup_logging()
        worker()
    elif "--selection-worker" in sys.argv:
        import json
        print(json.dumps(selection_bench()))
    else:
        main()
