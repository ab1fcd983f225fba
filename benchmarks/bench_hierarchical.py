"""Hierarchical gTop-k on emulated multi-rank nodes: dense Horovod vs flat vs hierarchical gTop-k.

Each layout N x L is one job on an emulated cluster (benchmarks/cluster.py with
``ranks_per_host=L``): N network namespaces, L ranks in each, 1 Gbit/s links between them.
Ranks of one node talk over the namespace's own loopback (unshaped), ranks of different nodes
through the shaped links, and a node's ``eth0`` byte counters measure what crossed the network.
In one job, side by side, per method:

- collective: one call on a random float32 gradient of ``d`` entries (25M by default, density
  0.001 and 0.01): ``hvd.allreduce_`` (dense ring), ``gtopk_allreduce_`` (flat gTop-k) and
  ``gtopk_allreduce(hierarchical=True)``, each rank with its own residual carried from call
  to call; the time of a call is the slowest rank's, its median over the repetitions;
- end-to-end: ResNet-20, VGG-16 (CIFAR-10 shapes) and the 25M MLP, SGD with momentum, one
  fixed random batch per rank: Horovod's ``DistributedOptimizer`` against gtopk_hvd's flat and
  hierarchical ones at the model granularity; seconds per iteration (whole block over the
  iterations, slowest rank);
- cross-node bytes: what a node's ``eth0`` sent per call / per iteration, averaged over the
  nodes (payload, TCP/IP headers, the barrier before each call and Horovod's coordination of
  the operations, which crosses nodes too), and gtopk_hvd's own count of the payload its
  operations put on the wire across nodes (as ``bytes_sent_cross`` of ``gtopk_stats()``,
  summed over the node's ranks; flat gTop-k: the stages whose group spans two nodes).

A layout with one rank a node (2 x 1) runs no hierarchical rows: hierarchical mode falls back
to flat gTop-k there (the log says so).  Every figure says how many ranks shared how many
cores (this machine: ``os.cpu_count()``), and every rank runs one intra-op thread.

    python benchmarks/bench_hierarchical.py                     # 2x2 and 2x1, ~15 min
    python benchmarks/bench_hierarchical.py --quick             # fewer repetitions
    python benchmarks/bench_hierarchical.py --layouts 2x2 --models mlp25m
    python benchmarks/bench_hierarchical.py --settings default,tuned   # + HOROVOD_CYCLE_TIME=5
                                                                       #   and huge pages

Writes benchmarks/results/hierarchical.csv and hierarchical.md.  Needs root for the network
namespaces; without it the cluster falls back to loopback (no shaping, one host) and the
tables say so.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, SETTINGS, WireCounter, load_config,  # noqa: E402
                               markdown_table, median, merge_rows, read_csv, run_workers,
                               save_result, setup_logging, write_csv)

logger = logging.getLogger("gtopk_bench.hierarchical")

CSV_PATH = RESULTS / "hierarchical.csv"
MD_PATH = RESULTS / "hierarchical.md"
BATCH = {"resnet20": 32, "vgg16": 16, "mlp25m": 32}  # as benchmarks/bench_end_to_end.py
METHODS = ("dense", "gtopk", "hierarchical")
KEY = ("setting", "layout", "kind", "what", "density", "method")


# ---------------------------------------------------------------------------------------------
# worker (every rank)

def _node_bytes(hvd, counter, local_rank, name):
    """(tx, rx) of each node's eth0 over the block just measured, from its local rank 0 (all
    the node's ranks read the same counters): a list over the nodes, gathered to every rank."""
    import torch
    tx, rx = counter.delta()
    mine = torch.tensor([[tx, rx] if local_rank == 0 else [float("nan")] * 2],
                        dtype=torch.float64)
    every = hvd.allgather(mine, name=name)
    return [tuple(row) for row in every.tolist() if row[0] == row[0]]


def _flat_cross_bytes(k, rank, size, local_size, wire="float32"):
    """What flat gTop-k's stages whose group spans two nodes make ``rank`` send (the
    library's byte count of a ring allgather, as in gtopk_stats())."""
    from gtopk_hvd.common.collective import ring_bytes
    from gtopk_hvd.common.schedule import stages_for
    total = 0
    for st in stages_for(rank, size):
        if len({m // local_size for m in st.group}) > 1:
            total += ring_bytes(st.group, rank, {m: k if st.sends(m) else 0 for m in st.group},
                                wire)
    return total


def _slowest(hvd, times, name):
    """Per call, the slowest rank's time; their median."""
    import torch
    every = hvd.allgather(torch.tensor([times], dtype=torch.float64), name=name)
    return median(every.max(dim=0).values.tolist())


def worker():
    cfg, out = load_config()
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import gtopk_hvd.torch as gtopk
    from benchmarks.models import MODELS, count_parameters
    from gtopk_hvd.common.density import k_for
    from gtopk_hvd.common.hierarchy import shard_bounds

    torch.set_num_threads(1)
    gtopk.init(hierarchical=True)
    rank, size = hvd.rank(), hvd.size()
    local_rank, local_size = hvd.local_rank(), hvd.local_size()
    nodes = size // local_size
    methods = [m for m in cfg["methods"] if m != "hierarchical" or local_size > 1]
    counter = WireCounter()
    rows = []

    def cross_model(method, numel, density):
        """gtopk_hvd's count of the bytes one node sends across nodes per call / step."""
        if method == "dense":
            return float("nan")
        node = range(rank // local_size * local_size, (rank // local_size + 1) * local_size)
        if method == "gtopk":
            return float(sum(_flat_cross_bytes(k_for(numel, density), m, size, local_size)
                             for m in node))
        from gtopk_hvd.common.collective import gtopk_wire_bytes
        bounds = shard_bounds(numel, local_size)
        return float(sum(gtopk_wire_bytes(k_for(hi - lo, density), m // local_size, nodes)
                         for m, (lo, hi) in zip(node, bounds)))

    def block(label, calls, run):
        """Time ``calls`` calls of ``run(i)`` after ``warmup`` untimed ones; (median slowest
        call, block seconds, cross-node tx per call and node)."""
        for i in range(cfg["warmup"]):
            run(i)
        times = []
        hvd.barrier()
        counter.start()
        t_block = time.perf_counter()
        for i in range(calls):
            hvd.barrier()
            t0 = time.perf_counter()
            run(cfg["warmup"] + i)
            times.append(time.perf_counter() - t0)
        hvd.barrier()
        block_s = time.perf_counter() - t_block
        per_node = _node_bytes(hvd, counter, local_rank, f"bytes.{label}")
        tx = sum(t for t, _ in per_node) / len(per_node)
        return _slowest(hvd, times, f"times.{label}"), block_s, tx / calls

    # collective
    for d in cfg["sizes"]:
        gen = torch.Generator().manual_seed(1000 + rank)
        grad = torch.randn(d, generator=gen)
        for density in cfg["densities"]:
            for method in methods:
                if method == "dense" and density != cfg["densities"][0]:
                    continue  # the same call at every density
                x = torch.empty_like(grad)
                state = {"eps": None}

                def run(i, method=method, x=x, state=state, density=density):
                    x.copy_(grad)
                    name = f"c.{d}.{density}.{method}"
                    if method == "dense":
                        hvd.allreduce_(x, name=name)
                    elif method == "gtopk":
                        state["eps"] = gtopk.gtopk_allreduce_(
                            x, density, name=name, residual=state["eps"]).residual
                    else:
                        state["eps"] = gtopk.gtopk_allreduce(
                            x, density, name=name, residual=state["eps"],
                            hierarchical=True).residual
                t, block_s, tx = block(f"c.{d}.{density}.{method}", cfg["reps"], run)
                rows.append({"kind": "collective", "what": f"{d / 1e6:g}M",
                             "density": density if method != "dense" else "-",
                             "method": method, "seconds": t, "cross_bytes": tx,
                             "cross_bytes_model": node_mean(
                                 hvd, cross_model(method, d, density), local_rank,
                                 f"m.c.{d}.{density}.{method}")})
                if rank == 0:
                    logger.info("collective %s %s %s: %.3f s, %.3f MB across per node",
                                d, density, method, t, tx / 1e6)
    # end to end
    for model_name in cfg["models"]:
        for method in methods:
            torch.manual_seed(0)
            model = MODELS[model_name]()
            batch = BATCH[model_name]
            gen = torch.Generator().manual_seed(rank)
            xb = torch.randn(batch, 3, 32, 32, generator=gen)
            yb = torch.randint(0, 10, (batch,), generator=gen)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if method == "dense":
                opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
            else:
                opt = gtopk.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                                 density=cfg["density"],
                                                 hierarchical=method == "hierarchical")
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)

            def run(i, model=model, opt=opt, xb=xb, yb=yb):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            _, block_s, tx = block(f"e.{model_name}.{method}", cfg["iters"], run)
            numel = count_parameters(model)
            rows.append({"kind": "end_to_end", "what": model_name, "density": cfg["density"]
                         if method != "dense" else "-", "method": method,
                         "seconds": _slowest(hvd, [block_s / cfg["iters"]],
                                             f"iter.{model_name}.{method}"),
                         "cross_bytes": tx,
                         "cross_bytes_model": node_mean(
                             hvd, cross_model(method, numel, cfg["density"]), local_rank,
                             f"m.e.{model_name}.{method}"),
                         "params": numel})
            if rank == 0:
                logger.info("%s %s: %.3f s/iter, %.3f MB across per node", model_name, method,
                            rows[-1]["seconds"], tx / 1e6)
            del model, opt
    if rank == 0:
        for r in rows:
            r.update(nodes=nodes, local_size=local_size, P=size, cores=os.cpu_count())
        save_result(out, {"rows": rows})
    hvd.barrier()


def node_mean(hvd, value, local_rank, name):
    """The mean over the nodes of a per-node ``value`` (every rank computes its node's; the
    nodes' local ranks 0 report it), by one allgather named ``name``."""
    import torch
    mine = torch.tensor([value if local_rank == 0 else float("nan")], dtype=torch.float64)
    every = [v for v in hvd.allgather(mine, name=name).tolist() if v == v]
    return sum(every) / len(every) if every else float("nan")


# ---------------------------------------------------------------------------------------------
# launcher

def report(rows, label, info_by_layout):
    lines = ["# Hierarchical gTop-k on emulated nodes", "",
             "Written by `python benchmarks/bench_hierarchical.py` "
             f"({time.strftime('%Y-%m-%d')}).  Network: {label}.  N x L: N network namespaces "
             "of L ranks; ranks of a node talk over its loopback, nodes through the shaped "
             "links.  Every rank runs one intra-op thread; all ranks share this machine's "
             f"{os.cpu_count()} cores.  Cross-node MB: a node's `eth0` tx per call / "
             "iteration, mean over the nodes (payload, headers, the barrier before each call, "
             "Horovod's coordination); 'payload MB': gtopk_hvd's count of what its operations "
             "send across nodes.  Settings: 'default' (Horovod's and glibc's), 'tuned' "
             "(HOROVOD_CYCLE_TIME=5, malloc huge pages; benchmarks/common.py).", ""]
    lines.append("Jobs of the last invocation (rows of earlier ones are kept, by setting and "
                 "layout):")
    for layout, info in info_by_layout.items():
        lines.append(f"- {layout}: {info}")
    lines.append("")
    for kind, title in (("collective", "Collective (one call)"),
                        ("end_to_end", "End to end (one training iteration)")):
        sub = [r for r in rows if r["kind"] == kind]
        if not sub:
            continue
        base = {(r["layout"], r["setting"], r["what"]): r["seconds"] for r in sub
                if r["method"] == "dense"}
        flat = {(r["layout"], r["setting"], r["what"], r["density"]): r for r in sub
                if r["method"] == "gtopk"}
        for r in sub:
            r["vs_dense"] = base.get((r["layout"], r["setting"], r["what"]),
                                     float("nan")) / r["seconds"]
            f = flat.get((r["layout"], r["setting"], r["what"], r["density"]))
            r["vs_flat"] = f["seconds"] / r["seconds"] if f else float("nan")
            r["bytes_vs_flat"] = (f["cross_bytes"] / r["cross_bytes"] if f and r["cross_bytes"]
                                  else float("nan"))
        lines += [f"## {title}", "", markdown_table(sub, [
            ("N x L", "layout", ""), ("ranks / cores", lambda r: f"{r['P']} / {r['cores']}", ""),
            ("setting", "setting", ""),
            ("what", "what", ""), ("density", "density", "g"), ("method", "method", ""),
            ("seconds", "seconds", ".3f"), ("speed-up vs dense", "vs_dense", ".2f"),
            ("speed-up vs flat", "vs_flat", ".2f"),
            ("cross-node MB per node", lambda r: r["cross_bytes"] / 1e6, ".3f"),
            ("payload MB", lambda r: r["cross_bytes_model"] / 1e6, ".3f"),
            ("flat / this bytes", "bytes_vs_flat", ".2f")]), ""]
    MD_PATH.write_text("\n".join(lines) + "\n")
    return MD_PATH


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="2x2,2x1", help="N x L, comma separated")
    parser.add_argument("--network", default="1gbit")
    parser.add_argument("--sizes", default="25000000")
    parser.add_argument("--densities", default="0.001,0.01")
    parser.add_argument("--models", default="resnet20,vgg16,mlp25m")
    parser.add_argument("--density", type=float, default=0.001, help="end-to-end density")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=5, help="collective calls timed")
    parser.add_argument("--iters", type=int, default=5, help="training iterations timed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 calls / iterations timed")
    parser.add_argument("--settings", default="default",
                        help=f"runtime settings, comma separated: {', '.join(SETTINGS)}")
    parser.add_argument("--mode", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--fresh", action="store_true", help="discard earlier rows in the CSV")
    parser.add_argument("--quiet-timeout", type=float, default=300)
    args = parser.parse_args()
    setup_logging()
    if args.quick:
        args.reps = args.iters = 3
    cfg = {"sizes": [int(s) for s in args.sizes.split(",") if s],
           "densities": [float(x) for x in args.densities.split(",")],
           "models": [m for m in args.models.split(",") if m], "density": args.density,
           "methods": args.methods.split(","), "reps": args.reps, "iters": args.iters,
           "warmup": args.warmup}
    rows, infos, label = [], {}, None
    for setting in args.settings.split(","):
        for layout in args.layouts.split(","):
            nodes, local = (int(x) for x in layout.lower().split("x"))
            result, info = run_workers(__file__, nodes * local, args.network, cfg,
                                       mode=args.mode, ranks_per_host=local,
                                       quiet_timeout=args.quiet_timeout,
                                       env=SETTINGS[setting])
            label = info["label"]
            infos[f"{layout} {setting}"] = (
                f"{info['label']}, {nodes * local} ranks on {os.cpu_count()} cores, link "
                f"{info.get('link_gbit', float('nan')):.3f} Gbit/s, RTT "
                f"{info.get('rtt_us', float('nan')):.0f} us, job {info['wall_s']:.0f} s")
            for r in result["rows"]:
                r.update(layout=layout, setting=setting, network=args.network,
                         label=info["label"])
            rows += result["rows"]
    if not args.fresh:  # rows of earlier runs stay, replaced where re-measured
        rows = merge_rows(read_csv(CSV_PATH), rows, KEY)
    write_csv(CSV_PATH, rows)
    path = report(rows, label, infos)
    print(path.read_text())


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
