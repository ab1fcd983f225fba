"""Where one gTop-k step's time goes (PyTorch), against a dense hvd.allreduce of the same tensor.

    python benchmarks/torch_step_breakdown.py            # launches horovodrun -np 4 itself
    horovodrun -np 4 -H localhost:4 --gloo python benchmarks/torch_step_breakdown.py

Every rank holds a float32 gradient of ``--numel`` elements (25M by default) and a residual;
one step at ``--density`` is timed phase by phase, as gtopk_hvd.torch.gtopk_allreduce runs it:

- compensate: acc = grad + residual;
- selection: the exact local top-k of |acc| (TorchOps.select_topk), and, for scale, one
  ``acc.abs()`` pass (the selection's target is at most 3x that);
- exchange / merge: the hypercube stages' allgathers and merge-and-truncates;
- decompress: the global set scattered into a dense tensor, divided by P;
- residual: eps = acc with the surviving local entries cleared.

Each phase is the median over ``--runs`` timed steps (after ``--warmup``) of the slowest rank
(a step is as slow as its slowest rank).  Rank 0 prints a Markdown table with each phase's
share of the step and its ratio to the dense allreduce.  On one machine the ranks talk over
loopback and share its cores, so the exchange here measures latency and CPU, not a network.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--np", type=int, default=4, help="ranks when launching horovodrun")
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def launch(args):
    """Not under horovodrun: start ``--np`` ranks of this script on localhost (Gloo)."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [str(bindir / "horovodrun"), "-np", str(args.np), "-H", f"localhost:{args.np}",
           "--gloo", sys.executable, __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env=env, cwd=str(ROOT))


def timed_step(hvd, grad, residual, k, size):
    """One gTop-k step split into phases; returns {phase: seconds} and the new residual."""
    from gtopk_hvd.torch.collective import compensate, decompress, exchange, update_residual

    times = {}
    start = time.perf_counter()
    acc = compensate(grad, residual)
    times["compensate"] = time.perf_counter() - start
    start = time.perf_counter()
    acc.abs()
    times["abs"] = time.perf_counter() - start
    result = exchange(acc, k, "gtopk", name="breakdown", profile=True)
    times.update(result.timings)  # selection, exchange, merge
    start = time.perf_counter()
    decompress(result, acc.numel(), "gtopk", size)
    times["decompress"] = time.perf_counter() - start
    start = time.perf_counter()
    residual = update_residual(acc, result)
    times["residual"] = time.perf_counter() - start
    return times, residual


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(args):
    import torch

    import gtopk_hvd.torch as hvd
    from gtopk_hvd.common import k_for

    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    k = k_for(args.numel, args.density)
    gen = torch.Generator().manual_seed(rank)
    residual = torch.zeros(args.numel)
    samples = []
    for i in range(args.warmup + args.runs):
        grad = torch.randn(args.numel, generator=gen)
        hvd.barrier()
        times, residual = timed_step(hvd, grad, residual, k, size)
        hvd.barrier()
        times["gtopk step (end to end)"] = timed(
            lambda: hvd.gtopk_allreduce(grad, density=args.density, name="e2e",
                                        residual=residual))
        hvd.barrier()
        times["topk allgather step (end to end)"] = timed(
            lambda: hvd.gtopk_allreduce(grad, density=args.density, name="topk",
                                        algorithm="topk", residual=residual))
        hvd.barrier()
        times["dense hvd.allreduce"] = timed(lambda: hvd.allreduce(grad, name="dense"))
        if i >= args.warmup:
            samples.append(times)
    every_rank = hvd.allgather_object(samples)
    if rank == 0:
        report(args, size, k, every_rank)
    hvd.shutdown()


def report(args, size, k, every_rank):
    phases = list(every_rank[0][0])
    # per run the slowest rank, then the median over runs
    med = {ph: statistics.median(max(rank_samples[r][ph] for rank_samples in every_rank)
                                 for r in range(args.runs)) for ph in phases}
    step = sum(med[ph] for ph in ("compensate", "selection", "exchange", "merge", "decompress",
                                  "residual"))
    dense = med["dense hvd.allreduce"]
    print(f"\ngTop-k step breakdown: P={size}, d={args.numel:,} float32, density "
          f"{args.density} (k={k:,}), median of {args.runs} runs (slowest rank per run)\n")
    print("| phase | median ms | share of gTop-k step | vs dense allreduce |")
    print("| --- | ---: | ---: | ---: |")
    for ph in ("compensate", "selection", "exchange", "merge", "decompress", "residual"):
        print(f"| {ph} | {med[ph] * 1e3:.1f} | {med[ph] / step:.1%} | {med[ph] / dense:.3f}x |")
    print(f"| **sum of phases** | {step * 1e3:.1f} | 100% | {step / dense:.3f}x |")
    for ph in ("gtopk step (end to end)", "topk allgather step (end to end)",
               "dense hvd.allreduce"):
        print(f"| {ph} | {med[ph] * 1e3:.1f} | | {med[ph] / dense:.3f}x |")
    print(f"\nselection / one acc.abs() pass: {med['selection'] / med['abs']:.2f}x "
          f"(abs {med['abs'] * 1e3:.1f} ms; target <= 3x)")
    gtopk_bytes = 8 * k * (size.bit_length() - 1)
    print(f"bytes sent per rank: gTop-k about {gtopk_bytes:,} (8k per stage), dense ring "
          f"allreduce {2 * (size - 1) * 4 * args.numel // size:,}")


def main():
    args = parse_args()
    if "HOROVOD_RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        sys.exit(launch(args))
    measure(args)


if __name__ == "__main__":
    main()
