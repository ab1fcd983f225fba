"""Intra-op threads and the library's small operations (PyTorch), with and without other
processes competing for the cores.

Times ``merge_truncate`` (two k-entry sets) and ``select_topk`` (k of d) of
gtopk_hvd.torch.ops with ``torch.set_num_threads(1)`` and with the default thread count, side
by side in one invocation, first on a quiet machine, then while ``--busy`` busy-looping
processes (standing in for the other ranks of a job on the same host) hold the cores.
Prints the median time of each and the ratio default / one thread::

    python benchmarks/bench_threads.py                # busy = number of cores
    python benchmarks/bench_threads.py --busy 3 --k 25000 --d 25000000

It is the measurement issue #11 asks for before choosing a thread policy; it changes nothing
in the library.
"""
import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from gtopk_hvd.torch.ops import merge_truncate, select_topk  # noqa: E402


def _spin(stop):
    x = 0
    while not stop.is_set():
        x += 1


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(k, d, repeats, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    low = (torch.randn(k, generator=g), torch.sort(torch.randperm(4 * k, generator=g)[:k])[0]
           .to(torch.int32))
    high = (torch.randn(k, generator=g), torch.sort(torch.randperm(4 * k, generator=g)[:k])[0]
            .to(torch.int32))
    acc = torch.randn(d, generator=g)
    merge = _median(lambda: merge_truncate(low, high, k), repeats)
    select = _median(lambda: select_topk(acc, k), max(3, repeats // 10))
    return merge, select


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=25000)
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--busy", type=int, default=os.cpu_count())
    args = parser.parse_args()
    default = torch.get_num_threads()
    print(f"{os.cpu_count()} cores, default intra-op threads {default}, k = {args.k}, "
          f"d = {args.d}, medians of {args.repeats} (selection: {max(3, args.repeats // 10)})")
    print("| load | threads | merge_truncate ms | select_topk ms |")
    print("|---|---|---|---|")
    for load in (0, args.busy):
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,)) for _ in range(load)]
        for p in spinners:
            p.start()
        try:
            for threads in (1, default):
                merge, select = measure(args.k, args.d, args.repeats, threads)
                print(f"| {load} busy processes | {threads} | {merge * 1e3:.2f} | "
                      f"{select * 1e3:.2f} |", flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join()


if __name__ == "__main__":
    main()
