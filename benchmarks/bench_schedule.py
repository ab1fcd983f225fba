"""Cost of the symmetric schedule against an earlier one, side by side in one invocation.

For each world size, the same timing worker (``gtopk_allreduce_`` of a float32 buffer, a
warm-up, then timed calls separated by a barrier) runs under ``horovodrun`` on loopback once
with this checkout and once with a baseline checkout (a git worktree of ``--baseline``, by
default the commit before the symmetric schedule, whose extra ranks fold / unfold), alternating
``--rounds`` times.  Reported: the median over calls of the slowest rank's time per call, and
the ratio new / baseline.  Several ranks share this machine's cores: the table says how many.

    .venv/bin/python benchmarks/bench_schedule.py --sizes 3,5,6,7 --numel 1000000
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "cdf9689"  # last commit with the fold / unfold schedule


def worker(numel, density, calls):
    import torch

    import gtopk_hvd.torch as hvd
    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    g = torch.Generator().manual_seed(rank)
    grad = torch.randn(numel, generator=g)
    residual = torch.zeros(numel)
    times = []
    for i in range(calls + 3):
        x = grad.clone()
        hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{i}")
        t0 = time.perf_counter()
        hvd.gtopk_allreduce_(x, density=density, residual=residual, name="bench")
        times.append(time.perf_counter() - t0)
    rows = hvd.allgather(torch.tensor([times[3:]], dtype=torch.float64), name="bench.times")
    if rank == 0:
        slowest = rows.max(dim=0).values.tolist()
        print("RESULT " + json.dumps({"size": size, "median_s": statistics.median(slowest)}))
    hvd.shutdown()


def run(checkout, size, args):
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1",
               HOROVOD_GLOO_TIMEOUT_SECONDS="120")
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(size), "-H",
           f"localhost:{size}", "--gloo", sys.executable, str(Path(__file__).resolve()),
           "--worker", "--numel", str(args.numel), "--density", str(args.density),
           "--calls", str(args.calls)]
    out = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True,
                         timeout=600)
    for line in out.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])["median_s"]
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--sizes", default="3,5,6,7")
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE)
    args = ap.parse_args()
    if args.worker:
        return worker(args.numel, args.density, args.calls)
    with tempfile.TemporaryDirectory(prefix="gtopk_baseline_") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        try:
            print(f"| P (ranks on {os.cpu_count()} cores) | baseline {args.baseline} (s/call) "
                  f"| symmetric (s/call) | symmetric / baseline |")
            print("| --- | --- | --- | --- |")
            for size in (int(s) for s in args.sizes.split(",")):
                old, new = [], []
                for _ in range(args.rounds):  # alternate, so drifting load hits both
                    old.append(run(base, size, args))
                    new.append(run(ROOT, size, args))
                o, n = statistics.median(old), statistics.median(new)
                print(f"| {size} | {o:.4f} | {n:.4f} | {n / o:.2f} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           capture_output=True)


if __name__ == "__main__":
    main()
