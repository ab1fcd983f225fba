"""The thread policy of ``init()`` measured: training steps with the framework's default
intra-op threads against the share ``init()`` gives each rank (gtopk_hvd.common.threads).

Each rank trains a benchmark model (forward, backward, gTop-k ``step()``) on a fixed random
batch, alternating blocks of iterations with ``torch.set_num_threads(default)`` and with
the policy's count, so both see the same machine state; rank 0 prints the median iteration
time of the slowest rank for each, and their ratio.  Launch it with horovodrun, with
``OMP_NUM_THREADS`` unset (it would turn the policy off)::

    horovodrun -np 4 -H localhost:4 python benchmarks/bench_thread_policy.py
    horovodrun -np 8 -H host1:4,host2:4 python benchmarks/bench_thread_policy.py --model vgg16

With one rank per host the policy changes nothing and the script says so.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

default_threads = torch.get_num_threads()  # before init() applies the policy

import gtopk_hvd.torch as hvd  # noqa: E402
from benchmarks.models import MODELS  # noqa: E402
from gtopk_hvd.common.threads import host_cores, threads_for  # noqa: E402

BATCH = {"resnet20": 32, "vgg16": 16, "mlp25m": 32}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per thread setting")
    parser.add_argument("--iters", type=int, default=3, help="iterations per block")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        sys.exit("unset OMP_NUM_THREADS: it sets the threads itself and turns the policy off")
    os.environ["GTOPK_HVD_THREADS"] = "keep"  # this script switches the threads itself
    hvd.init()
    policy = threads_for(default_threads, host_cores(), hvd.local_size(), environ={})
    settings = {"default": default_threads, "policy": policy or default_threads}
    torch.manual_seed(0)
    model = MODELS[args.model]()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                   named_parameters=model.named_parameters(),
                                   density=args.density)
    gen = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(BATCH[args.model], 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH[args.model],), generator=gen)
    times = {name: [] for name in settings}
    for block in range(1 + args.blocks):  # block 0 warms up with both settings
        for name, threads in settings.items():
            torch.set_num_threads(threads)
            for _ in range(args.iters):
                hvd.barrier()
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                elapsed = torch.tensor([time.perf_counter() - start])
                slowest = hvd.allreduce(elapsed, op=hvd.Max, name="policy.t").item()
                if block:
                    times[name].append(slowest)
    if hvd.rank() == 0:
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        print(f"{args.model}, gTop-k density {args.density}, P = {hvd.size()} ranks "
              f"({hvd.local_size()} on this host, {host_cores()} cores); intra-op threads: "
              f"default {default_threads}, policy {settings['policy']}"
              + ("" if policy else " (the policy changes nothing here)"))
        print("\n| threads | iteration s (median of slowest rank) | / default |\n|---|---|---|")
        for name, t in med.items():
            print(f"| {name} ({settings[name]}) | {t:.4f} | {t / med['default']:.2f} |")
    hvd.shutdown()


if __name__ == "__main__":
    main()
