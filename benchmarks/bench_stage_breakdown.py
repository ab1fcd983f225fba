"""Where a gTop-k exchange stage's time goes during training (PyTorch): waiting for the
partner, Horovod's negotiation and the transfer, the merge.

Every rank trains a benchmark model (synthetic batch, SGD with momentum) with the gTop-k
``DistributedOptimizer``; each stage's allgather is timed on every rank from the moment the
rank hands its message to Horovod (enqueue) to the moment the gathered result is back
(done), on the host's clock.  Per stage and rank:

- partner wait: the last enqueue among the stage's group minus this rank's own enqueue
  (nothing can move before every member has its message ready: this is the skew of the
  ranks' backward passes and selections, not communication);
- negotiation + transfer: done minus the last enqueue of the group (Horovod's background
  threads agreeing on the operation, then Gloo moving the bytes);
- transfer at line rate: the bytes this rank receives divided by the link's rate (from the
  emulated cluster's measurement; 1 Gbit/s assumed on real hosts), for scale;
- merge: the library's merge-and-truncate of the stage (``profile=True``).

Medians over ranks and timed iterations.  On the emulated cluster every namespace shares the
host's clock; under horovodrun on real hosts the ranks' clocks differ by their NTP offsets
(about a millisecond), which blurs the split between waiting and negotiation::

    python benchmarks/bench_stage_breakdown.py                       # P = 4, 1 Gbit/s
    python benchmarks/bench_stage_breakdown.py --models resnet20 --networks 1gbit,unshaped
    horovodrun -np 4 -H a:2,b:2 python benchmarks/bench_stage_breakdown.py --procs 4

Writes benchmarks/results/stage_breakdown.csv and stage_breakdown.md.
"""
import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, load_config, markdown_table, median,  # noqa: E402
                               merge_rows, read_csv, run_workers, save_result, setup_logging,
                               write_csv)

logger = logging.getLogger("gtopk_bench.stage_breakdown")
BATCH = {"resnet20": 32, "vgg16": 16, "mlp25m": 32}


def worker():
    cfg, out = load_config()
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F

    import gtopk_hvd.torch as gtopk
    from gtopk_hvd.torch.step import TorchStep
    from benchmarks.models import MODELS
    from gtopk_hvd.common.schedule import stages_for
    from gtopk_hvd.torch.ops import TorchOps

    torch.set_num_threads(1)
    gtopk.init()
    rank, size = hvd.rank(), hvd.size()
    events, merges = [], []
    plain_allgather, plain_grouped = TorchOps.allgather, TorchStep.exchange

    def allgather(self, message, process_set, name):
        start = time.time()
        gathered = plain_allgather(self, message, process_set, name)
        events.append({"name": name, "enqueue": start, "done": time.time(),
                       "received": (gathered.numel() - message.numel()) * 4})
        return gathered

    def exchange(self, *args, **kw):
        results = plain_grouped(self, *args, **kw)
        merges.append(results[0].timings.get("merge", 0.0))
        return results

    TorchStep.profile = True
    TorchOps.allgather, TorchStep.exchange = allgather, exchange
    stages = stages_for(rank, size)
    rows = []
    for model_name in cfg["models"]:
        torch.manual_seed(0)
        model = MODELS[model_name]()
        opt = gtopk.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            named_parameters=model.named_parameters(), density=cfg["density"],
            granularity=cfg["granularity"])
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(BATCH[model_name], 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (BATCH[model_name],), generator=gen)
        mine = []
        for it in range(cfg["warmup"] + cfg["iters"]):
            del events[:], merges[:]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if it >= cfg["warmup"]:
                mine.append({"events": list(events), "merge": sum(merges)})
        everyone = hvd.allgather_object(mine, name=f"stages.{model_name}")
        groups = hvd.allgather_object([st.group for st in stages], name=f"groups.{model_name}")
        if rank == 0:
            rows += _summarise(everyone, groups, model_name, size, cfg)
        del model, opt
    TorchOps.allgather, TorchStep.exchange = plain_allgather, plain_grouped
    TorchStep.profile = False
    if rank == 0:
        save_result(out, {"rows": rows})
    hvd.barrier()


def _summarise(everyone, groups, model_name, size, cfg):
    rows = []
    n_stages = len(groups[0])
    for s in range(n_stages):
        waits, after, received, merge = [], [], [], []
        for i in range(len(everyone[0])):
            enqueue = [r_iters[i]["events"][s]["enqueue"] for r_iters in everyone]
            for r in range(size):
                ev = everyone[r][i]["events"][s]
                last = max(enqueue[m] for m in groups[r][s])
                waits.append(last - ev["enqueue"])
                after.append(ev["done"] - last)
                received.append(ev["received"])
        for r in range(size):
            merge += [it["merge"] / max(1, n_stages) for it in everyone[r]]
        rate = cfg.get("link_bytes_per_s") or 125e6
        rows.append({"model": model_name, "granularity": cfg["granularity"], "P": size,
                     "density": cfg["density"], "stage": s,
                     "received_bytes": median(received),
                     "partner_wait_s": median(waits), "negotiation_transfer_s": median(after),
                     "transfer_at_line_rate_s": median(received) / rate,
                     "merge_s": median(merge), "iters": len(everyone[0])})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,vgg16,mlp25m")
    parser.add_argument("--networks", default="1gbit")
    parser.add_argument("--procs", default="4")
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--granularity", default="model", choices=["model", "layer"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--quiet-timeout", type=float, default=900)
    args = parser.parse_args()
    setup_logging()
    csv_path = RESULTS / "stage_breakdown.csv"
    rows = read_csv(csv_path)
    for net in args.networks.split(","):
        for p in map(int, args.procs.split(",")):
            cfg = {"models": args.models.split(","), "density": args.density,
                   "granularity": args.granularity, "iters": args.iters,
                   "warmup": args.warmup}
            result, info = run_workers(__file__, p, net, cfg, mode=args.mode,
                                       quiet_timeout=args.quiet_timeout)
            network = net if info["label"] not in ("loopback", "hosts") else info["label"]
            gbit = info.get("link_gbit")
            for r in result["rows"]:
                r.update(network=network, link_gbit=gbit if gbit else float("nan"))
                if gbit:  # the measured rate, not the assumed 1 Gbit/s
                    r["transfer_at_line_rate_s"] = r["received_bytes"] * 8 / (gbit * 1e9)
            rows = merge_rows(rows, result["rows"],
                              ("network", "P", "model", "granularity", "density", "stage"))
            write_csv(csv_path, rows)
    cols = [("network", "network", ""), ("P", "P", "d"), ("model", "model", ""),
            ("granularity", "granularity", ""), ("stage", "stage", "d"),
            ("received B", "received_bytes", ".0f"),
            ("partner wait s", "partner_wait_s", ".4f"),
            ("negotiation + transfer s", "negotiation_transfer_s", ".4f"),
            ("transfer at line rate s", "transfer_at_line_rate_s", ".5f"),
            ("merge s", "merge_s", ".4f")]
    text = ("## One gTop-k stage during training: where its time goes\n\n"
            + markdown_table(rows, cols) + "\n")
    (RESULTS / "stage_breakdown.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        setup_logging()
        worker()
    else:
        main()
