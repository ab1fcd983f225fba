"""End-to-end training throughput: dense Horovod vs Top-k allgather vs gTop-k (PyTorch).

ResNet-20 and VGG-16 on CIFAR-10 shapes and an MLP of 25M parameters (benchmarks/models.py),
synthetic data (one fixed random batch per rank: no input pipeline), SGD with momentum, on an
emulated cluster (benchmarks/cluster.py), P = 4 on 1 Gbit/s by default.  Per model and method:
samples/s over all ranks and the time per iteration split into

- compute: forward + backward (for dense Horovod this includes the allreduces its hooks start
  during the backward pass, which overlap with it);
- selection, communication (exchange), merge: the gTop-k / Top-k phases of
  ``DistributedOptimizer.step()`` (the library's ``profile=True`` timings, summed over buffers);
  for dense Horovod, communication is the wait in ``step()`` for the allreduces;
- other: the rest of ``step()`` (compensation, decompression, residual, the SGD update).

    python benchmarks/bench_end_to_end.py            # P=4, 1gbit, density 0.001, ~10 min
    python benchmarks/bench_end_to_end.py --quick    # fewer iterations
    python benchmarks/bench_end_to_end.py --networks 1gbit,10gbit --procs 4,8
    python benchmarks/bench_end_to_end.py --methods dense,gtopk,gtopk_layer,auto,auto_layer

Methods (PyTorch): dense (Horovod's DistributedOptimizer), topk / gtopk (model granularity),
gtopk_layer (one buffer per tensor), auto / auto_layer (``algorithm="auto"``; the table says
what it chose), gtopk_bucket (``granularity="bucket"``, exchanged during the backward pass;
``gtopk_bucket@0.25``: ``bucket_cap_mb=0.25``; its compute column then includes the exchanges
the hooks run).  TensorFlow runs dense, topk and gtopk.

Writes benchmarks/results/end_to_end.csv, end_to_end.png and end_to_end.md.  Iterations are
few (2 warm-up + 5 timed by default): 4 ranks share 2 cores, so compute is about 2x slower
than on 4 real hosts and the speed-ups here understate what sparsification buys on a cluster
where the network, not the CPU, is the bottleneck.
"""
import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, SETTINGS, WireCounter, load_config,  # noqa: E402
                               markdown_table, median, merge_rows, read_csv, run_workers,
                               save_result, setup_logging, write_csv)

logger = logging.getLogger("gtopk_bench.end_to_end")

BATCH = {"resnet20": 32, "vgg16": 16, "mlp25m": 32}
# PyTorch methods: (algorithm, granularity) of gtopk_hvd's DistributedOptimizer; "dense" is
# Horovod's.  TensorFlow runs dense, topk and gtopk.
TORCH_METHODS = {"topk": ("topk", "model"), "gtopk": ("gtopk", "model"),
                 "gtopk_layer": ("gtopk", "layer"), "auto": ("auto", "model"),
                 "auto_layer": ("auto", "layer"), "gtopk_bucket": ("gtopk", "bucket")}
METHOD_ORDER = ["dense", *TORCH_METHODS]


def torch_method(method):
    """(algorithm, granularity, extra keyword arguments) of a PyTorch method name;
    ``gtopk_bucket@X`` is granularity='bucket' with bucket_cap_mb=X."""
    name, _, cap = method.partition("@")
    algorithm, granularity = TORCH_METHODS[name]
    return algorithm, granularity, {"bucket_cap_mb": float(cap)} if cap else {}
PHASES = ("compute", "selection", "communication", "merge", "other")


# ---------------------------------------------------------------------------------------------
# worker

def _instrument(record):
    """Have the gTop-k optimizer's collective record its per-phase timings into ``record``.

    Wraps ``gtopk_hvd.torch.step.TorchStep.exchange`` (the library's collective entry point;
    one call per step for all buffers) with profiling on; returns False if the library is
    organised differently.
    """
    import gtopk_hvd.torch.step as gstep
    orig = getattr(getattr(gstep, "TorchStep", None), "exchange", None)
    if orig is None:
        return False

    def exchange(self, accs, ks, algorithm, *args, **kwargs):
        results = orig(self, accs, ks, algorithm, *args, **kwargs)
        if algorithm == "gtopk" and len(results) > 1:
            record.append(results[0].timings)  # one timer for the whole group
        else:
            for res in results:
                record.append(res.timings)
        return results

    gstep.TorchStep.profile = True
    gstep.TorchStep.exchange = exchange
    return True


def worker():
    cfg, out = load_config()
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import gtopk_hvd.torch as gtopk
    from benchmarks.models import MODELS, count_parameters

    torch.set_num_threads(1)
    gtopk.init()
    rank, size = hvd.rank(), hvd.size()
    phase_log = []
    instrumented = _instrument(phase_log)
    counter = WireCounter()
    rows = []
    for model_name in cfg["models"]:
        for method in cfg["methods"]:
            torch.manual_seed(0)
            model = MODELS[model_name]()
            batch = BATCH[model_name]
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(batch, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if method == "dense":
                opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
            else:
                algorithm, granularity, extra = torch_method(method)
                opt = gtopk.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                                 density=cfg["density"], algorithm=algorithm,
                                                 granularity=granularity, **extra)
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            iters = []
            hvd.barrier()
            for it in range(cfg["warmup"] + cfg["iters"]):
                if it == cfg["warmup"]:
                    hvd.barrier()
                    counter.start()
                    t_block = time.perf_counter()
                del phase_log[:]
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                if it >= cfg["warmup"]:
                    ph = {p: sum(t.get(p, 0.0) for t in phase_log)
                          for p in ("selection", "exchange", "merge")}
                    iters.append({"compute": t1 - t0, "step": t2 - t1, **ph})
            hvd.barrier()
            block_s = time.perf_counter() - t_block
            tx, rx = counter.delta()
            mine = {"iters": iters, "block_s": block_s, "tx": tx / cfg["iters"]}
            if method.startswith("auto"):
                stats = opt.gtopk_stats()
                mine["chose"] = ", ".join(f"{n} {m}" for m, n in stats["methods"].items())
            everyone = hvd.allgather_object(mine, name=f"gather.{model_name}.{method}")
            if rank == 0:
                rows.append(_summarise(everyone, model_name, method, batch, size,
                                       count_parameters(model), cfg, instrumented))
                logger.info("%s %s: %.2f samples/s, %.3f s/iter", model_name, method,
                            rows[-1]["samples_per_s"], rows[-1]["iter_s"])
            del model, opt
    if rank == 0:
        save_result(out, {"rows": rows})
    hvd.barrier()


def worker_tf():
    """TensorFlow: the tape path users take (eager).  Per iteration: forward (inside the tape),
    tape.gradient() (backward + synchronisation), apply_gradients().  The backward pass alone
    is timed once per model on a plain tape; communication = gradient() minus that."""
    cfg, out = load_config()
    import horovod.tensorflow as plain_hvd
    import tensorflow as tf

    import gtopk_hvd.tensorflow as hvd
    from benchmarks.models_tf import MODELS_TF

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    counter = WireCounter()
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = []
    for model_name in cfg["models"]:
        batch = BATCH[model_name]
        x = tf.random.stateless_normal((batch, 32, 32, 3), seed=(rank, 0))
        y = tf.random.stateless_uniform((batch,), seed=(rank, 1), maxval=10, dtype=tf.int32)
        for method in cfg["methods"]:
            tf.keras.utils.set_random_seed(0)
            model = MODELS_TF[model_name]()
            opt = tf.keras.optimizers.SGD(0.01, momentum=0.9)
            plain_hvd.broadcast_variables(model.variables, root_rank=0)
            state = None if method == "dense" else hvd.GTopkState(
                cfg["density"], algorithm=method)

            def local_backward():
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                t0 = time.perf_counter()
                tape.gradient(loss, model.trainable_variables)
                return time.perf_counter() - t0

            iters = []
            for it in range(cfg["warmup"] + cfg["iters"]):
                if it == cfg["warmup"]:
                    backward = median([local_backward() for _ in range(3)])
                    plain_hvd.join()  # a barrier for TF eager
                    counter.start()
                    t_block = time.perf_counter()
                t0 = time.perf_counter()
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                t1 = time.perf_counter()
                if method == "dense":
                    tape = plain_hvd.DistributedGradientTape(tape)
                else:
                    tape = hvd.DistributedGradientTape(tape, gtopk_state=state)
                grads = tape.gradient(loss, model.trainable_variables)
                t2 = time.perf_counter()
                opt.apply_gradients(zip(grads, model.trainable_variables))
                t3 = time.perf_counter()
                if it >= cfg["warmup"]:
                    iters.append({"forward": t1 - t0, "gradient": t2 - t1, "apply": t3 - t2})
            plain_hvd.join()
            block_s = time.perf_counter() - t_block
            tx, _ = counter.delta()
            mine = {"iters": iters, "backward": backward, "block_s": block_s,
                    "tx": tx / cfg["iters"]}
            everyone = hvd.allgather_object(mine, name=f"gather.tf.{model_name}.{method}")
            if rank == 0:
                n = len(iters)
                per_iter = [max(sum(r["iters"][i].values()) for r in everyone) for i in range(n)]
                iter_s = median(per_iter)

                def mm(key):
                    return sum(median([it[key] for it in r["iters"]]) for r in everyone) / size
                bwd = sum(r["backward"] for r in everyone) / size
                comm = max(0.0, mm("gradient") - bwd)
                rows.append({"model": model_name, "params": int(sum(
                    v.shape.num_elements() for v in model.trainable_variables)),
                    "method": method, "density": 1.0 if method == "dense" else cfg["density"],
                    "P": size, "batch_per_rank": batch, "iters": n, "iter_s": iter_s,
                    "samples_per_s": size * batch / iter_s,
                    "samples_per_s_block": size * batch * n / max(r["block_s"] for r in everyone),
                    "compute_s": mm("forward") + bwd, "selection_s": 0.0,
                    "communication_s": comm, "merge_s": 0.0, "other_s": mm("apply"),
                    "step_s": mm("gradient") - bwd + mm("apply"),
                    "tx_bytes_per_iter": sum(r["tx"] for r in everyone) / size,
                    "breakdown": "comm = gradient() - local backward (estimated)"})
                logger.info("tf %s %s: %.2f samples/s, %.3f s/iter", model_name, method,
                            rows[-1]["samples_per_s"], iter_s)
    if rank == 0:
        save_result(out, {"rows": rows})
    plain_hvd.join()


def _summarise(everyone, model_name, method, batch, size, params, cfg, instrumented):
    n = len(everyone[0]["iters"])
    per_iter = [max(r["iters"][i]["compute"] + r["iters"][i]["step"] for r in everyone)
                for i in range(n)]
    iter_s = median(per_iter)

    def mean_median(key):
        return sum(median([it[key] for it in r["iters"]]) for r in everyone) / len(everyone)

    compute, step = mean_median("compute"), mean_median("step")
    if method == "dense":
        sel, comm, merge = 0.0, step, 0.0
    else:
        sel, comm, merge = (mean_median(k) for k in ("selection", "exchange", "merge"))
    block = max(r["block_s"] for r in everyone)
    return {"model": model_name, "params": params, "method": method,
            "density": 1.0 if method == "dense" else cfg["density"], "P": size,
            "batch_per_rank": batch, "iters": n, "iter_s": iter_s,
            "samples_per_s": size * batch / iter_s,
            "samples_per_s_block": size * batch * n / block,
            "compute_s": compute, "selection_s": sel, "communication_s": comm,
            "merge_s": merge, "other_s": max(0.0, step - sel - comm - merge),
            "step_s": step, "tx_bytes_per_iter": sum(r["tx"] for r in everyone) / len(everyone),
            "breakdown": "step only" if "bucket" in method or not (
                instrumented or method == "dense") else "profiled",
            "chose": everyone[0].get("chose", "")}


# ---------------------------------------------------------------------------------------------
# launcher

def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["framework"], r["setting"], r["network"], r["P"]) for r in rows})
    models = [m for m in BATCH if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(len(groups), len(models), figsize=(4.3 * len(models),
                                                                 3.6 * len(groups)),
                             squeeze=False)
    colors = dict(zip(PHASES, ("tab:green", "tab:olive", "tab:blue", "tab:purple",
                               "lightgray")))
    for i, (fw, setting, net, p) in enumerate(groups):
        for j, m in enumerate(models):
            ax = axes[i][j]
            sel = [r for r in rows if (r["framework"], r["setting"], r["network"], r["P"],
                                       r["model"]) == (fw, setting, net, p, m)]
            sel.sort(key=lambda r: (METHOD_ORDER.index(r["method"].partition("@")[0]),
                                    r["method"]))
            bottom = [0.0] * len(sel)
            for phase in PHASES:
                vals = [r[f"{phase}_s"] for r in sel]
                ax.bar(range(len(sel)), vals, bottom=bottom, color=colors[phase], label=phase)
                bottom = [b + v for b, v in zip(bottom, vals)]
            for k, r in enumerate(sel):
                ax.text(k, bottom[k], f"{r['samples_per_s']:.0f}/s", ha="center",
                        va="bottom", fontsize=7)
            ax.set_xticks(range(len(sel)))
            ax.set_xticklabels([r["method"] for r in sel], fontsize=8)
            ax.set_title(f"{fw}: {m} ({sel[0]['params'] / 1e6:.2g}M), {net} P={p} {setting}"
                         if sel else m, fontsize=8)
            if j == 0:
                ax.set_ylabel("seconds per iteration")
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle("time per iteration (label: samples/s over all ranks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows):
    cols = [("framework", "framework", ""), ("setting", "setting", ""),
            ("network", "network", ""), ("P", "P", "d"), ("model", "model", ""),
            ("params", lambda r: f"{r['params'] / 1e6:.2f}M", ""),
            ("method", "method", ""), ("rho", lambda r: "-" if r["method"] == "dense"
                                       else f"{r['density']:g}", ""),
            ("samples/s", "samples_per_s", ".1f"), ("s/iter", "iter_s", ".3f"),
            ("compute", "compute_s", ".3f"), ("selection", "selection_s", ".3f"),
            ("communication", "communication_s", ".3f"), ("merge", "merge_s", ".3f"),
            ("other", "other_s", ".3f"), ("tx MB/iter/rank",
                                          lambda r: r["tx_bytes_per_iter"] / 1e6, ".3f"),
            ("speed-up vs dense", "speedup", ".2f"),
            ("auto chose", lambda r: r.get("chose") or "", "")]
    return "## End-to-end training, per iteration\n\n" + markdown_table(rows, cols) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed iterations")
    parser.add_argument("--models", default="resnet20,vgg16,mlp25m")
    parser.add_argument("--methods", default="dense,topk,gtopk")
    parser.add_argument("--networks", default="1gbit")
    parser.add_argument("--procs", default="4")
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--frameworks", default="torch",
                        help="comma-separated: torch, tf (gtopk_hvd.tensorflow's tape)")
    parser.add_argument("--settings", default="default",
                        help="comma-separated: default, tuned (see benchmarks/common.py)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--quiet-timeout", type=float, default=900,
                        help="wait up to this many seconds for other work to leave the CPUs "
                             "idle before each cluster run (0: do not wait)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--out", default="end_to_end",
                        help="results file names: <out>.csv, .md, .png under results/")
    args = parser.parse_args()
    setup_logging()
    if args.quick:
        args.iters, args.warmup = 3, 1
    csv_path = RESULTS / f"{args.out}.csv"
    rows = read_csv(csv_path)
    key = ("framework", "setting", "network", "P", "model", "method", "density")
    for r in rows:
        r.setdefault("framework", "torch")
    if not args.plot_only:
        runs = itertools.product(args.frameworks.split(","), args.settings.split(","),
                                 args.networks.split(","), map(int, args.procs.split(",")))
        for fw, setting, net, p in runs:
            cfg = {"framework": fw, "models": args.models.split(","),
                   "methods": args.methods.split(","), "density": args.density,
                   "iters": args.iters, "warmup": args.warmup}
            log_dir = RESULTS / "tmp" / f"bench_end_to_end-{fw}-{net}-P{p}"
            result, info = run_workers(__file__, p, net, cfg, mode=args.mode,
                                       env=SETTINGS[setting], quiet_timeout=args.quiet_timeout,
                                       log_dir=log_dir)
            network = net if info["label"] not in ("loopback", "hosts") else info["label"]
            for r in result["rows"]:
                r.update(framework=fw, setting=setting, network=network, label=info["label"],
                         foreign_cpu=info["foreign_cpu"],
                         link_gbit=info.get("link_gbit", float("nan")))
            rows = merge_rows(rows, result["rows"], key)
            write_csv(csv_path, rows)
            logger.info("%s %s [%s] P=%d done in %.0f s", fw, info["label"], setting, p,
                        info["wall_s"])
    for r in rows:
        dense = [d for d in rows if d["method"] == "dense" and all(
            d[k] == r[k] for k in ("framework", "setting", "network", "P", "model"))]
        r["speedup"] = r["samples_per_s"] / dense[0]["samples_per_s"] if dense else float("nan")
    if rows:
        write_csv(csv_path, rows)
        plot(rows, RESULTS / f"{args.out}.png")
    text = report(rows)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        setup_logging()
        worker_tf() if load_config()[0].get("framework") == "tf" else worker()
    else:
        main()
