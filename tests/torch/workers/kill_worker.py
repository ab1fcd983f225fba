"""One rank is killed with SIGKILL in the middle of training; the others must raise Horovod's
catchable HorovodInternalError (what Horovod Elastic relies on) instead of aborting.

Run by test_torch_robustness.py under ``horovodrun`` inside ``sh -c '...; exit 0'``, so that
horovodrun does not terminate the survivors when the victim dies: each survivor records what
it caught and how long after the kill.
"""
import os
import signal
import sys
import time

import torch
from _common import Recorder

import gtopk_hvd.torch as hvd


def main(victim):
    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()
    rec = Recorder(rank)
    model = torch.nn.Linear(50, 10)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), density=0.1)
    with rec("survivor_catches_horovod_internal_error") as data:
        try:
            for step in range(2000):
                if step == 5:
                    hvd.barrier()
                    killed_at = time.time()
                    if rank == victim:
                        os.kill(os.getpid(), signal.SIGKILL)
                opt.zero_grad()
                model(torch.randn(4, 50)).sum().backward()
                opt.step()
        except hvd.HorovodInternalError as exc:
            data["seconds"] = time.time() - killed_at
            data["message"] = str(exc)[:200]
        else:
            raise AssertionError("training went on after a rank died")
    rec.save()
    sys.exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
