"""Tune gTop-k training settings fast: P workers simulated in one process, no Horovod.

Each step computes the P workers' gradients on their own shards of MNIST-1D (the model and
data of examples/pytorch_mnist1d.py), combines them with the NumPy reference
``gtopk_hvd.common.reference.gtopk_step`` (the same residuals, global set and average that
every rank of gtopk_hvd computes) and applies the result with SGD.  60 epochs take about 30 s
instead of several minutes under horovodrun on 2 cores, so densities, warm-up lengths and
learning rates can be compared before bench_convergence.py measures the chosen set-up for
real.  The data order differs from the Horovod run (no DistributedSampler), so single numbers
differ by about a point; the trends are what this is for.

    python benchmarks/simulate_convergence.py --density 0.001 --epochs 60 --warmup-epochs 8
    python benchmarks/simulate_convergence.py --dense --epochs 60
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_example  # noqa: E402
from gtopk_hvd.common.density import ExponentialWarmupDensity, k_for  # noqa: E402
from gtopk_hvd.common.reference import gtopk_step  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", action="store_true", help="average the gradients densely")
    parser.add_argument("--density", type=float, default=0.001, help="final density")
    parser.add_argument("--warmup-epochs", type=int, default=8)
    parser.add_argument("--warmup-initial", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--procs", type=int, default=4, help="simulated world size P")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.075, help="per worker, scaled by P")
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    ex = load_example()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train_set, test_set = ex.datasets()
    x, y = train_set.tensors
    x_test, y_test = test_set.tensors
    model = ex.ConvNet()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=args.lr * args.procs, momentum=args.momentum)
    steps_per_epoch = math.ceil(len(x) / args.procs / args.batch_size)
    schedule = ExponentialWarmupDensity(final=args.density, initial=args.warmup_initial,
                                        warmup_epochs=args.warmup_epochs,
                                        steps_per_epoch=steps_per_epoch)
    residuals = [np.zeros(d, np.float32) for _ in range(args.procs)]
    order = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=order)
        shards = [perm[r::args.procs] for r in range(args.procs)]
        for s in range(steps_per_epoch):
            grads = []
            for shard in shards:
                batch = shard[s * args.batch_size:(s + 1) * args.batch_size]
                model.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy())
            if args.dense:
                update = np.mean(grads, axis=0, dtype=np.float32)
            else:
                accs = [g + e for g, e in zip(grads, residuals)]
                result = gtopk_step(accs, k_for(d, schedule(step)))
                residuals = result.residuals
                update = np.zeros(d, np.float32)
                update[result.indices] = result.values / args.procs
            offset = 0
            for p in params:
                p.grad = torch.from_numpy(update[offset:offset + p.numel()].copy()).view_as(p)
                offset += p.numel()
            opt.step()
            step += 1
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:3d}  test accuracy {accuracy:.4f}", flush=True)
    method = "dense" if args.dense else f"gTop-k {args.density:g}"
    print(f"final test accuracy {accuracy:.4f} ({method}, P={args.procs}, {d} parameters, "
          f"seed {args.seed})")


if __name__ == "__main__":
    main()
