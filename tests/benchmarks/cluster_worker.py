"""Rank of the emulated-cluster smoke test: one allreduce, checked on every rank.

Writes {"rank", "size", "ok", "label", "tx", "rx", "error"} as JSON to
$GTOPK_SMOKE_OUT/rank<r>.json.  With GTOPK_SMOKE_NODES=1 (hosts of several ranks) also the
ranks' local and cross rank and size, and "node_tx": what the host's interface sent while
the ranks of each host allreduced 4 MB among themselves (in a process set of the host).
"""
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.cluster import cluster_label, iface_bytes  # noqa: E402


def main():
    import horovod.torch as hvd
    import torch

    nodes = os.environ.get("GTOPK_SMOKE_NODES") == "1"
    hvd.init(process_sets="dynamic" if nodes else None)
    rank, size = hvd.rank(), hvd.size()
    record = {"rank": rank, "size": size, "label": cluster_label(), "ok": False}
    try:
        if nodes:
            local, hosts = hvd.local_size(), hvd.cross_size()
            record.update(local_rank=hvd.local_rank(), local_size=local,
                          cross_rank=hvd.cross_rank(), cross_size=hosts)
            sets = [hvd.add_process_set(list(range(h * local, (h + 1) * local)))
                    for h in range(hosts)]
            mine = sets[rank // local]
            hvd.allreduce(torch.ones(10), name="warm", process_set=mine)
            hvd.barrier()
            tx0, _ = iface_bytes()
            hvd.allreduce(torch.ones(1_000_000), name="node", process_set=mine)
            tx1, _ = iface_bytes()
            record["node_tx"] = tx1 - tx0
        tx0, rx0 = iface_bytes()
        x = torch.arange(10_000, dtype=torch.float32) * (rank + 1)
        y = hvd.allreduce(x, op=hvd.Sum, name="smoke")
        expected = torch.arange(10_000, dtype=torch.float32) * (size * (size + 1) // 2)
        assert torch.equal(y, expected), f"allreduce result wrong on rank {rank}: {y[:4]}"
        hvd.barrier()  # the partner received everything: our interface has sent it
        tx1, rx1 = iface_bytes()
        record.update(ok=True, tx=tx1 - tx0, rx=rx1 - rx0)
    except Exception:  # reported to pytest, which asserts on every rank
        record["error"] = traceback.format_exc()
    Path(os.environ["GTOPK_SMOKE_OUT"], f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
