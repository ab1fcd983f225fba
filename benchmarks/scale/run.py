"""The SimGrid model's four results (benchmarks/README.md, "At scale"):

- validation: every dense / Top-k / gTop-k row of the collective benchmark at P = 2 and 4 on
  1 Gbit/s, and the end-to-end rows at P = 2 (a core per rank), predicted vs measured
  (``scale_validation.csv``); the model is calibrated on the 10 Gbit/s rows only
  (calibrate.py);
- the ICDCS 2019 comparison (32 workers, 8 nodes of 4 GPUs, 1 Gbit/s; ``scale_paper.csv``);
- the projection: flat P = 4..1024 and N x 8 up to 128 x 8, 1 / 10 / 25 / 100 Gbit/s,
  densities 0.001 and 0.01, every method (``scale_projection.csv`` and plots);
- ``auto``'s choice against the simulator's fastest (``scale_auto.csv``).

    benchmarks/scale/setup.sh          # once: SimGrid's Python bindings into .venv
    .venv/bin/python -m benchmarks.scale.run [--only validation,paper,projection] [--quick]

The exchanges of one (platform, method, density) are simulated at two model sizes and
interpolated (the time is affine in d: k = rho d, every message and every piece of local work
grows with d, partners do not change); ``--check-line`` compares the line with a direct
simulation.
"""
import argparse
import csv
import sys
import time
from functools import lru_cache

from benchmarks.scale import calibrate, model
from benchmarks.scale.layers import total_flops, total_params
from benchmarks.scale.simulate import Platform, available

RESULTS = calibrate.RESULTS
NETWORKS = (1, 10, 25, 100)
DENSITIES = (0.001, 0.01)
FLAT = (4, 16, 64, 256, 1024)
TWO_LEVEL = (2, 8, 32, 128)  # nodes of 8 ranks
LINE_D = (1_000_000, 100_000_000)

# GPU compute (published): ResNet-50 v1.5 on one V100 16GB, mixed precision, 1200 images/s
# (NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md,
# pytorch-21.03 container); the other models at the same effective FLOP rate.
V100_RATE = 1200 * 3 * total_flops("resnet50")  # FLOP/s, forward + backward (x3)
# K80 (one GK210 of the ICDCS cluster): 4.37 TFLOP/s fp32 peak (NVIDIA's K80 datasheet, 8.73
# for the two GPUs of a board), taken at 30% (an assumption; the paper gives no per-iteration
# compute times we could read)
K80_RATE = 0.3 * 4.37e12
GPU_MODELS = {"resnet50": 64, "vgg16": 64, "bert_base": 32}  # batch per GPU (BERT: sequences)


def gpu_compute(model_name, batch, rate=V100_RATE):
    return batch * 3 * total_flops(model_name) / rate


@lru_cache(maxsize=None)
def line(platform, method, density, work):
    """(t0, slope): the exchange's seconds as a line in d, from two simulated sizes."""
    t1 = model.exchange_time(platform, method, LINE_D[0], density, work)
    t2 = model.exchange_time(platform, method, LINE_D[1], density, work)
    slope = (t2 - t1) / (LINE_D[1] - LINE_D[0])
    return t1 - slope * LINE_D[0], slope


def line_exchange(platform, method, d, density, work):
    """A sparse exchange's seconds read off :func:`line`."""
    t0, slope = line(platform, method, density, work)
    return t0 + slope * d


def iteration(model_name, compute_s, platform, method, density, work):
    """model.iteration_time with the sparse exchanges from :func:`line`."""
    return model.iteration_time(model_name, compute_s, platform, method, density, work,
                                exchange=line_exchange)


# ---- validation

def validation():
    rows = []
    works = {(p, rho): calibrate.fit_local_work(p, rho) for p in (2, 4) for rho in DENSITIES}
    for p in (2, 4):
        for r in calibrate.load_rows(P=p, network="1gbit", setting="default"):
            if r["method"] not in ("dense", "topk", "gtopk"):
                continue
            plat = calibrate.platform_of(r)
            rho = float(r["density"])
            pred = model.exchange_time(plat, r["method"], int(r["d"]), rho,
                                       works[(p, rho if rho < 1 else 0.01)])
            rows.append({"case": f"collective d={r['d']} rho={r['density']}", "ranks": p,
                         "network": "1gbit", "method": r["method"],
                         "measured_s": float(r["time_s"]), "predicted_s": pred,
                         "cores": 2})
    for r in calibrate.load_rows("end_to_end.csv", P=2, network="1gbit", setting="default",
                                 framework="torch"):
        if r["method"] not in ("dense", "gtopk"):
            continue
        name = {"vgg16": "vgg16_cifar"}.get(r["model"], r["model"])
        # the end-to-end rows carry no RTT: the collective runs' on the same network
        latency = calibrate.platform_of(calibrate.load_rows(P=2, network="1gbit")[0])
        plat = Platform(2, 1, float(r["link_gbit"]), latency.net_latency_s)
        rho = float(r["density"])
        pred, _ = model.iteration_time(name, float(r["compute_s"]), plat, r["method"], rho,
                                       works[(2, rho if rho < 1 else 0.01)])
        rows.append({"case": f"end-to-end {r['model']}", "ranks": 2, "network": "1gbit",
                     "method": r["method"], "measured_s": float(r["iter_s"]),
                     "predicted_s": pred, "cores": 2})
    for row in rows:
        row["error_pct"] = 100 * (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
    _write("scale_validation.csv", rows)
    return rows, works


# ---- the paper

PAPER = {  # ICDCS 2019, 32 workers on 1 Gbit/s, density 0.001: the ranges ALGORITHM.md quotes
    "dense": "2.7-12", "topk": "1.1-1.7"}
PAPER_MODELS = {"vgg16_cifar": 32, "resnet20": 32, "resnet50": 64}  # batch (exp_configs/*.conf)


def paper():
    plat = Platform(8, 4, 1.0, 25e-6, intra_gbit=64.0)  # PCIe 3 x16 ~ 8 GB/s
    work = calibrate.GPU_WORK
    rows = []
    for name, batch in PAPER_MODELS.items():
        compute = gpu_compute(name, batch, K80_RATE)
        t = {m: iteration(name, compute, plat, m, 0.001, work)[0]
             for m in ("dense", "topk", "gtopk")}
        for base in ("dense", "topk"):
            rows.append({"model": name, "workers": 32, "network": "1gbit", "baseline": base,
                         "paper_speedup": PAPER[base],
                         "predicted_speedup": t[base] / t["gtopk"],
                         "iteration_gtopk_s": t["gtopk"], "compute_s": compute})
    _write("scale_paper.csv", rows)
    return rows


# ---- projection and auto

def projection_platforms():
    for gbit in NETWORKS:
        for p in FLAT:
            yield Platform(p, 1, float(gbit), 5e-6)
        for n in TWO_LEVEL:
            yield Platform(n, 8, float(gbit), 5e-6, intra_gbit=100.0)


def projection_models(works):
    cpu = {}
    for r in calibrate.load_rows("end_to_end.csv", network="1gbit", setting="default",
                                 framework="torch", method="dense"):
        name = {"vgg16": "vgg16_cifar"}.get(r["model"], r["model"])
        if name not in cpu or r["P"] == "2":  # P = 2: a core per rank
            cpu[name] = float(r["compute_s"])
    models = [(m, gpu_compute(m, b), calibrate.GPU_WORK, "V100 (published rate)")
              for m, b in GPU_MODELS.items()]
    models += [(m, c, works, "this CPU (measured)") for m, c in sorted(cpu.items())]
    return models


def projection(works, quick=False):
    rows, auto_rows = [], []
    platforms = list(projection_platforms())
    if quick:
        platforms = [p for p in platforms if p.size <= 64]
    for i, plat in enumerate(platforms):
        start = time.time()
        for name, compute, cpu_work, source in projection_models(works):
            for density in DENSITIES:
                work = cpu_work[(2, density)] if isinstance(cpu_work, dict) else cpu_work
                methods = ["dense", "topk", "gtopk"] + (["hierarchical"]
                                                        if plat.ranks_per_node > 1 else [])
                times = {m: iteration(name, compute, plat, m, density, work)[0]
                         for m in methods}
                auto_t, chose = iteration(name, compute, plat, "auto", density, work)
                for m, t in list(times.items()) + [("auto", auto_t)]:
                    rows.append({"model": name, "nodes": plat.nodes,
                                 "ranks_per_node": plat.ranks_per_node,
                                 "network_gbit": plat.net_gbit, "density": density,
                                 "method": m, "iteration_s": t,
                                 "speedup_vs_dense": times["dense"] / t,
                                 "compute": source, "auto_chose": chose if m == "auto" else ""})
                fastest = min(times, key=times.get)
                among = min(("dense", "gtopk"), key=times.get)
                # what auto chooses between: gTop-k, or dense after the backward pass
                after = model.dense_after_backward(total_params(name),
                                                   compute, plat, work)
                can = "dense" if after <= times["gtopk"] else "gtopk"
                auto_rows.append({"model": name, "nodes": plat.nodes,
                                  "ranks_per_node": plat.ranks_per_node,
                                  "network_gbit": plat.net_gbit, "density": density,
                                  "auto_choice": chose, "fastest_method": fastest,
                                  "fastest_of_dense_gtopk": among,
                                  "auto_loss_pct": 100 * (auto_t / times[among] - 1),
                                  "fastest_auto_can_run": can,
                                  "auto_loss_vs_its_options_pct":
                                      100 * (auto_t / min(after, times["gtopk"]) - 1)})
        print(f"[{i + 1}/{len(platforms)}] {plat.nodes} x {plat.ranks_per_node} at "
              f"{plat.net_gbit:g} Gbit/s: {time.time() - start:.0f} s", file=sys.stderr)
    _write("scale_projection.csv", rows)
    _write("scale_auto.csv", auto_rows)
    return rows, auto_rows


def _write(name, rows):
    with open(RESULTS / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def check_line():
    """The interpolated exchange against a direct simulation at the models' sizes."""
    plat = Platform(16, 8, 10.0, 5e-6)
    for method in ("topk", "gtopk", "hierarchical"):
        for name in ("resnet50", "vgg16"):
            d = total_params(name)
            t0, slope = line(plat, method, 0.001, calibrate.GPU_WORK)
            direct = model.exchange_time(plat, method, d, 0.001, calibrate.GPU_WORK)
            print(f"{method:12s} {name:9s} line {t0 + slope * d:.5f} s  direct {direct:.5f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="validation,paper,projection")
    ap.add_argument("--quick", action="store_true", help="projection up to 64 ranks")
    ap.add_argument("--check-line", action="store_true")
    args = ap.parse_args(argv)
    if not available():
        sys.exit("SimGrid's Python bindings are missing: run benchmarks/scale/setup.sh "
                 "(Debian's python3-simgrid, linked into .venv)")
    if args.check_line:
        check_line()
        return
    only = set(args.only.split(","))
    works = {(p, rho): calibrate.fit_local_work(p, rho) for p in (2, 4) for rho in DENSITIES}
    if "validation" in only:
        rows, works = validation()
        for r in rows:
            print(f"{r['case']:34s} P={r['ranks']} {r['method']:6s} measured "
                  f"{r['measured_s']:.4f} predicted {r['predicted_s']:.4f} "
                  f"({r['error_pct']:+.0f}%)")
    if "paper" in only:
        for r in paper():
            print(f"paper {r['model']:12s} vs {r['baseline']:5s}: paper {r['paper_speedup']}x,"
                  f" predicted {r['predicted_speedup']:.2f}x")
    if "projection" in only:
        projection(works, quick=args.quick)
        from benchmarks.scale.plots import plot_all
        plot_all()


if __name__ == "__main__":
    main()
