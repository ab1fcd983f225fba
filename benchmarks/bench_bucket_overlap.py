"""Where a bucketed step's time goes on every rank: forward, backward (with the exchanges its
gradient hooks advance), the time inside those hooks, and what ``step()`` still waits for.

A plain horovodrun program (real hosts work as they are):

    horovodrun -np 2 -H localhost:2 python benchmarks/bench_bucket_overlap.py
    horovodrun -np 4 -H localhost:4 python benchmarks/bench_bucket_overlap.py \\
        --model vgg16 --methods model,bucket,bucket@0.25 --rounds 2

Methods: ``dense`` (Horovod's DistributedOptimizer), ``model`` / ``layer`` / ``bucket``
(gtopk_hvd's granularity; ``bucket@X``: ``bucket_cap_mb=X``).  Each round runs every method
for ``--iters`` iterations after a barrier, so methods alternate in blocks; rank 0 prints
per rank the medians (seconds) over all timed iterations.  One intra-op thread per rank.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--methods", default="dense,model,bucket,bucket@0.25")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.001)
    args = parser.parse_args()

    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import gtopk_hvd.torch as gtopk
    import gtopk_hvd.torch.buckets as buckets
    from benchmarks.models import MODELS

    torch.set_num_threads(1)
    gtopk.init()
    rank = hvd.rank()
    in_hooks = [0.0]
    advance = buckets.BucketPipeline.advance

    def timed_advance(self, block):
        t = time.perf_counter()
        try:
            return advance(self, block)
        finally:
            if not block:
                in_hooks[0] += time.perf_counter() - t

    buckets.BucketPipeline.advance = timed_advance
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    setups, samples = {}, {m: [] for m in args.methods.split(",")}
    for _ in range(args.rounds):
        for method in samples:
            if method not in setups:
                torch.manual_seed(0)
                model = MODELS[args.model]()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                name, _, cap = method.partition("@")
                if name == "dense":
                    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
                else:
                    opt = gtopk.DistributedOptimizer(
                        opt, named_parameters=model.named_parameters(), density=args.density,
                        granularity=name, **({"bucket_cap_mb": float(cap)} if cap else {}))
                hvd.broadcast_parameters(model.state_dict(), root_rank=0)
                setups[method] = (model, opt, args.warmup)
            model, opt, warmup = setups[method]
            hvd.barrier()
            for it in range(warmup + args.iters):
                in_hooks[0] = 0.0
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                if it >= warmup:
                    samples[method].append((t1 - t0, t2 - t1, in_hooks[0], t3 - t2))
            setups[method] = (model, opt, 0)

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    mine = {m: [median(col) for col in zip(*rows)] for m, rows in samples.items()}
    everyone = hvd.allgather_object(mine, name="bucket_overlap.results")
    if rank == 0:
        print(f"{args.model}, P = {hvd.size()}, density {args.density}, {args.rounds} rounds x "
              f"{args.iters} iterations; medians in seconds per rank: forward / backward "
              f"(hooks included) / in hooks / step")
        for method in samples:
            cells = ["  ".join(f"{v:.3f}" for v in ranks[method]) for ranks in everyone]
            slowest = max(sum(ranks[method][:2]) + ranks[method][3] for ranks in everyone)
            print(f"{method:>14}: " + " | ".join(cells) + f"   slowest rank's sum {slowest:.3f}")
    hvd.barrier()


if __name__ == "__main__":
    main()
