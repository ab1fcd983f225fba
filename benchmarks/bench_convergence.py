"""Convergence: dense Horovod vs gTop-k S-SGD on MNIST-1D, test accuracy per epoch.

The model and data are those of examples/pytorch_mnist1d.py (its ``ConvNet`` and
``datasets()``, imported from the example, so the benchmark trains what the example trains);
the training loop is the example's, plus a density warm-up:
``ExponentialWarmupDensity(final=rho, initial=0.25, warmup_epochs=8)`` (DGC's schedule: 0.25
down to rho, geometrically, stretched over the first 8 of 60 epochs), per step.  P = 4 on the emulated 1 Gbit/s
cluster, the same seeds, data order, learning rate and epochs for every method; several seeds
because one MNIST-1D run moves by about a point from seed to seed.

    python benchmarks/bench_convergence.py                 # 3 seeds x (dense, 0.01, 0.001)
    python benchmarks/bench_convergence.py --quick         # 1 seed, 10 epochs
    python benchmarks/bench_convergence.py --plot-only

Writes benchmarks/results/convergence.csv (one row per seed, method and epoch),
convergence.png and convergence.md (final accuracy, mean and spread over seeds).
"""
import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, load_config, load_example,  # noqa: E402
                               launched_by_horovodrun, markdown_table, merge_rows, read_csv,
                               run_workers, save_result,
                               setup_logging, write_csv)

logger = logging.getLogger("gtopk_bench.convergence")


# ---------------------------------------------------------------------------------------------
# worker: every (seed, method) in one Horovod job

def worker():
    cfg, out = load_config()
    import horovod.torch as plain_hvd
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    import gtopk_hvd.torch as hvd
    from gtopk_hvd.common.density import ExponentialWarmupDensity

    ex = load_example()
    torch.set_num_threads(1)
    hvd.init(hierarchical=any(m.startswith("h") for m in cfg["methods"]))
    rank, size = hvd.rank(), hvd.size()
    train_set, test_set = ex.datasets()
    rows = []
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:  # "dense", a density ("0.001"), "h0.001": hierarchical
            torch.manual_seed(seed)
            sampler = DistributedSampler(train_set, num_replicas=size, rank=rank, seed=seed)
            loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler)
            test_loader = DataLoader(test_set, batch_size=250, sampler=DistributedSampler(
                test_set, num_replicas=size, rank=rank, shuffle=False))
            model = ex.ConvNet()
            opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"] * size,
                                  momentum=cfg["momentum"])
            if method == "dense":
                opt = plain_hvd.DistributedOptimizer(opt,
                                                     named_parameters=model.named_parameters())
            else:
                schedule = ExponentialWarmupDensity(
                    final=_density(method), initial=cfg["warmup_initial"],
                    warmup_epochs=cfg["warmup_epochs"], steps_per_epoch=len(loader))
                opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               density=schedule,
                                               granularity=cfg["granularity"],
                                               hierarchical=method.startswith("h"))
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            start = time.perf_counter()
            for epoch in range(cfg["epochs"]):
                sampler.set_epoch(epoch)
                loss_sum = torch.zeros(2, dtype=torch.float64)
                sent = 0
                for x, y in loader:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    loss_sum += torch.tensor([loss.item() * y.numel(), y.numel()],
                                             dtype=torch.float64)
                    if method != "dense":
                        sent += opt.gtopk_stats()["bytes_sent"]
                totals = hvd.allreduce(loss_sum, op=hvd.Sum, name="loss")
                accuracy = ex.evaluate(model, test_loader)
                density = 1.0 if method == "dense" else opt.gtopk_stats()["density"]
                if rank == 0:
                    rows.append({"seed": seed, "method": method, "epoch": epoch + 1,
                                 "train_loss": totals[0].item() / totals[1].item(),
                                 "test_accuracy": accuracy, "density_now": density,
                                 "bytes_sent_epoch": sent,
                                 "elapsed_s": time.perf_counter() - start})
            if rank == 0:
                logger.info("seed %d %s: final accuracy %.4f in %.0f s", seed, method,
                            rows[-1]["test_accuracy"], rows[-1]["elapsed_s"])
    if rank == 0:
        params = sum(p.numel() for p in ex.ConvNet().parameters())
        save_result(out, {"rows": rows, "params": params})
    hvd.barrier()


# ---------------------------------------------------------------------------------------------
# launcher

def _variant(args):
    """Name of a training set-up other than the example's (lr, momentum, granularity)."""
    parts = []
    if args.momentum != 0.5:
        parts.append(f"momentum {args.momentum:g}")
    if args.lr != 0.075:
        parts.append(f"lr {args.lr:g}")
    if args.granularity != "model":
        parts.append(f"{args.granularity}-wise")
    if (args.warmup_epochs, args.warmup_initial) != (8, 0.25):
        parts.append(f"warm-up {args.warmup_initial:g} over {args.warmup_epochs}")
    return ", ".join(parts) or "as the example"


def _density(method):
    """The final density of a method name: "0.001", or "h0.001" (hierarchical)."""
    return float(method[1:] if method.startswith("h") else method)


def _label(method):
    if method == "dense":
        return "dense"
    return f"hierarchical gTop-k {method[1:]}" if method.startswith("h") else f"gTop-k {method}"


def summary(all_rows):
    out = []
    dense_rows = [r for r in all_rows if r["method"] == "dense" and
                  r["variant"] == "as the example"]
    for variant in dict.fromkeys(r["variant"] for r in all_rows):
        rows = [r for r in all_rows if r["variant"] == variant]
        own_dense = any(r["method"] == "dense" for r in rows)
        # a variant without its own dense run is compared with the example's
        out += _summary(rows, variant, rows if own_dense else dense_rows)
    return out


def _summary(rows, variant, dense_rows):
    out = []
    methods = sorted({str(r["method"]) for r in rows},
                     key=lambda m: (-1.0, 0) if m == "dense" else (-_density(m), m.startswith("h")))
    last = max(r["epoch"] for r in rows)
    dense = [r["test_accuracy"] for r in dense_rows if str(r["method"]) == "dense"
             and r["epoch"] == last]
    for m in methods:
        finals = [r["test_accuracy"] for r in rows if str(r["method"]) == m and r["epoch"] == last]
        best = [max(r["test_accuracy"] for r in rows if str(r["method"]) == m and r["seed"] == s)
                for s in sorted({r["seed"] for r in rows if str(r["method"]) == m})]
        mean = statistics.mean(finals)
        out.append({"variant": variant, "method": _label(m), "seeds": len(finals),
                    "epochs": last,
                    "final_mean": mean,
                    "final_std": statistics.stdev(finals) if len(finals) > 1 else float("nan"),
                    "final_min": min(finals), "final_max": max(finals),
                    "best_mean": statistics.mean(best),
                    "gap_to_dense_points": 100 * (mean - statistics.mean(dense)) if dense
                    else float("nan")})
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"dense": "k", "0.01": "tab:orange", "0.001": "tab:blue", "h0.01": "tab:red",
              "h0.001": "tab:green"}
    styles = dict(zip(variants, ("-", "--", ":", "-.")))
    for v in variants:
        vrows = [r for r in rows if r["variant"] == v]
        for m in dict.fromkeys(r["method"] for r in vrows):
            mrows = [r for r in vrows if r["method"] == m]
            seeds = sorted({r["seed"] for r in mrows})
            epochs = sorted({r["epoch"] for r in mrows})
            mean = [statistics.mean(r["test_accuracy"] for r in mrows if r["epoch"] == e)
                    for e in epochs]
            c = colors.get(m)
            if v == variants[0]:
                for s in seeds:
                    ax.plot(epochs, [r["test_accuracy"] for r in mrows if r["seed"] == s],
                            color=c, alpha=0.25, lw=0.8)
            label = _label(m) + ("" if v == "as the example" else f", {v}")
            ax.plot(epochs, mean, color=c, lw=2, ls=styles[v],
                    label=f"{label} (mean of {len(seeds)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    sizes = ", ".join(str(p) for p in sorted({int(r["P"]) for r in rows}))
    ax.set_title(f"MNIST-1D CNN, P = {sizes}: dense vs gTop-k (with a density warm-up)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--methods", default="dense,0.01,0.001",
                        help="'dense' and/or final densities of gTop-k ('h0.01': hierarchical "
                             "gTop-k, which needs nodes: run it under horovodrun -H "
                             "localhost:2,127.0.0.1:2)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank, as the example")
    parser.add_argument("--lr", type=float, default=0.075, help="per rank, as the example")
    parser.add_argument("--warmup-epochs", type=int, default=8)
    parser.add_argument("--warmup-initial", type=float, default=0.25)
    parser.add_argument("--momentum", type=float, default=0.5, help="as the example")
    parser.add_argument("--granularity", default="model", choices=["model", "layer"],
                        help="gTop-k buffers: the whole model (the paper) or one per tensor")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--network", default="1gbit")
    parser.add_argument("--mode", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--job-timeout", type=float, default=3 * 3600,
                        help="seconds one seed's Horovod job (every method) may take")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    setup_logging()
    if args.quick:
        args.seeds, args.epochs = "1", 10
    csv_path = RESULTS / "convergence.csv"
    rows = read_csv(csv_path)
    for r in rows:
        r["method"] = str(r["method"])  # "0.001" reads back as a number
        r.setdefault("variant", "as the example")
    if not args.plot_only:
        cfg = {"seeds": [int(s) for s in args.seeds.split(",")],
               "methods": args.methods.split(","), "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr,
               "warmup_epochs": args.warmup_epochs, "warmup_initial": args.warmup_initial,
               "momentum": args.momentum, "granularity": args.granularity}
        variant = _variant(args)
        rows = [r for r in rows if r.get("epochs_total") == args.epochs]  # comparable runs
        # one Horovod job per seed (a failure keeps the others); under horovodrun on real
        # hosts the job is this one: all seeds in it
        for seed in [None] if launched_by_horovodrun() else cfg["seeds"]:
            job = cfg if seed is None else dict(cfg, seeds=[seed])
            # accuracy does not depend on timing: no need to wait for an idle machine
            result, info = run_workers(__file__, args.procs, args.network, job, mode=args.mode,
                                       check=False, quiet_timeout=0,
                                       timeout=args.job_timeout)
            for r in result["rows"]:
                r.update(variant=variant, P=info["P"], label=info["label"],
                         epochs_total=args.epochs)
            rows = merge_rows(rows, result["rows"], ("variant", "method", "seed", "epoch"))
            write_csv(csv_path, rows)
            logger.info("%s P=%d seed %s done in %.0f s", info["label"], info["P"], seed,
                        info["wall_s"])
    if not rows:
        print("no results yet")
        return
    write_csv(csv_path, rows)
    plot(rows, RESULTS / "convergence.png")
    table = summary(rows)
    sizes = ", ".join(str(p) for p in sorted({int(r["P"]) for r in rows}))
    text = (f"## Convergence, MNIST-1D CNN, P = {sizes}\n\n" + markdown_table(table, [
        ("set-up", "variant", ""), ("method", "method", ""), ("seeds", "seeds", "d"),
        ("epochs", "epochs", "d"),
        ("final acc. mean", "final_mean", ".4f"), ("std", "final_std", ".4f"),
        ("min", "final_min", ".4f"), ("max", "final_max", ".4f"),
        ("best-epoch acc. mean", "best_mean", ".4f"),
        ("final gap to dense [points]", "gap_to_dense_points", "+.2f")]) + "\n")
    (RESULTS / "convergence.md").write_text(text)
    print(text)
    if any(math.isnan(t["gap_to_dense_points"]) for t in table):
        logger.info("no dense run in the results: the gap is not available")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        setup_logging()
        worker()
    else:
        main()
