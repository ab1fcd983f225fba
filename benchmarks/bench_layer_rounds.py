"""Synchronisation time of one buffer per tensor against one buffer per model (PyTorch).

Times ``DistributedOptimizer.synchronize()`` (compensate, select, exchange, merge, decompress,
residual; no forward or backward) on fixed random gradients of a benchmark model, side by
side in one job, for:

- ``model``: ``granularity="model"`` (one buffer, log2 P exchange rounds);
- ``layer``: ``granularity="layer"``, all tensors' sets of a stage in one allgather (log2 P
  rounds, the library's behaviour);
- ``layer_sequential``: ``granularity="layer"`` with one exchange per tensor after the other
  (L x log2 P rounds: the library's behaviour before the grouped exchange, reproduced with
  ``gtopk_hvd.torch.collective.exchange_each``);
- ``dense``: Horovod's ``grouped_allreduce`` of all gradients (the dense baseline);
- ``auto`` / ``auto_layer``: ``algorithm="auto"`` at model / layer granularity (the link is
  measured after the first warm-up step; the table notes what it chose).

Launch it with horovodrun; it runs unchanged on real hosts::

    horovodrun -np 4 -H localhost:4 python benchmarks/bench_layer_rounds.py
    horovodrun -np 8 -H host1:4,host2:4 python benchmarks/bench_layer_rounds.py --model vgg16

Rank 0 prints one line per method: the median over iterations of the slowest rank's time,
and the ratio to ``model``; with ``--out FILE`` it also writes them as Markdown.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import gtopk_hvd.torch as hvd  # noqa: E402
from gtopk_hvd.torch.step import TorchStep  # noqa: E402
from benchmarks.models import MODELS  # noqa: E402
from gtopk_hvd.torch.collective import exchange_each  # noqa: E402


def time_method(method, model, grads, density, iters, warmup, notes):
    params = list(model.parameters())
    if method == "dense":
        def step():
            hvd.grouped_allreduce([g.clone() for g in grads], name="bench.dense")
    else:
        granularity = "model" if method in ("model", "auto") else "layer"
        opt = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.0),
                                       named_parameters=model.named_parameters(),
                                       density=density, granularity=granularity,
                                       algorithm="auto" if method.startswith("auto") else "gtopk")
        grouped = TorchStep.exchange

        def sequential(self, accs, ks, algorithm, name, digest, flags, wire):
            return exchange_each(accs, ks, algorithm, name, digest=digest, flags=flags,
                                 wire=wire)

        def step():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            TorchStep.exchange = sequential if method == "layer_sequential" else grouped
            try:
                opt.synchronize()
            finally:
                TorchStep.exchange = grouped
    times = []
    for i in range(warmup + iters):
        hvd.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start])
        slowest = hvd.allreduce(elapsed, op=hvd.Max, name=f"bench.t.{method}").item()
        if i >= warmup:
            times.append(slowest)
    if method.startswith("auto"):
        stats = opt.gtopk_stats()
        link = stats["link"]
        notes[method] = (", ".join(f"{n} by {m}" for m, n in stats["methods"].items())
                         + f"; alpha {link['alpha'] * 1e6:.0f} us, beta "
                         f"{link['beta'] * 1e9:.2f} ns/B, select {link['select'] * 1e9:.2f} "
                         f"ns/entry, overhead {link['overhead'] * 1e6:.0f} us")
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="model,layer,layer_sequential,dense,auto,auto_layer")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    torch.manual_seed(0)
    model = MODELS[args.model]()
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(hvd.rank() * 1000 + i))
             for i, p in enumerate(model.parameters())]
    notes = {}
    rows = {m: time_method(m, model, grads, args.density, args.iters, args.warmup, notes)
            for m in args.methods.split(",")}
    if hvd.rank() == 0:
        cores = os.cpu_count()
        head = (f"{args.model}: {len(grads)} tensors, {sum(g.numel() for g in grads)} "
                f"parameters, density {args.density}, P = {hvd.size()} ranks "
                f"({hvd.local_size()} on this host, {cores} cores), OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
        lines = [head, "", "| method | synchronize() s (median of slowest rank) | / model "
                 "| / dense |", "|---|---|---|---|"]
        base, dense = rows.get("model"), rows.get("dense")
        for m, t in rows.items():
            ratio = f"{t / base:.2f}" if base else "-"
            to_dense = f"{t / dense:.2f}" if dense else "-"
            lines.append(f"| {m} | {t:.4f} | {ratio} | {to_dense} |")
        lines += [f"\n{m}: {note}" for m, note in notes.items()]
        print("\n".join(lines), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    hvd.shutdown()


if __name__ == "__main__":
    main()
