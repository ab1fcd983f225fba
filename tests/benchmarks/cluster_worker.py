"""Rank of the emulated-cluster smoke test: one allreduce, checked on every rank.

Writes {"rank", "size", "ok", "label", "tx", "rx", "error"} as JSON to
$GTOPK_SMOKE_OUT/rank<r>.json.
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

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    record = {"rank": rank, "size": size, "label": cluster_label(), "ok": False}
    try:
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
