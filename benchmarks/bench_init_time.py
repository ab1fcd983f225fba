"""``init()`` time and process-set count of hierarchical gTop-k on emulated nodes.

Run under horovodrun with a host list whose names all resolve to this machine, e.g.
``-H localhost:4,127.0.0.1:4`` (2 nodes of 4 ranks; add ``$(hostname):4`` for a third):
Horovod groups the ranks into nodes by those names (docs/pytorch.md).  Each rank times
``gtopk_hvd.torch.init(hierarchical=...)`` from the call to its return (Horovod's start, the
pair / fold sets of flat gTop-k, the node and rail sets), then rank 0 prints the slowest rank's
time, the layout and how many process sets the job registered.  ``--flat`` times the flat init
for comparison.  One process per invocation: Horovod cannot be initialised twice with other
process sets in one process.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flat", action="store_true", help="init() without hierarchical")
    args = parser.parse_args()
    import torch  # noqa: F401  (imported before the clock starts, as in a training script)

    import gtopk_hvd.torch as hvd
    from gtopk_hvd.common.process_sets import exchange_sets, hierarchical_sets

    start = time.perf_counter()
    hvd.init(hierarchical=not args.flat)
    seconds = time.perf_counter() - start
    slowest = hvd.allreduce(torch.tensor([seconds]), op=hvd.Max, name="init_time").item()
    flat_ids = {s.process_set_id for s in exchange_sets(hvd).values()} - {0}
    layout, sets = (None, {}) if args.flat else hierarchical_sets(hvd)
    hier_ids = {s.process_set_id for s in sets.values()} - {0}
    if hvd.rank() == 0:
        print(json.dumps({
            "ranks": hvd.size(), "nodes": hvd.cross_size(), "ranks_per_node": hvd.local_size(),
            "hierarchical": not args.flat, "mode": None if layout is None else layout.mode,
            "init_s_slowest_rank": round(slowest, 3),
            "process_sets_flat_exchange": len(flat_ids),
            "process_sets_node_and_rail": len(hier_ids),
            "process_sets_registered": len(flat_ids | hier_ids),
            "cores": os.cpu_count()}))
    hvd.shutdown()


if __name__ == "__main__":
    main()
