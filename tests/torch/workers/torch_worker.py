"""The torch test job: every scenario of the torch backend in one ``horovodrun -np N``.

Started once per world size by tests/torch/conftest.py.  First Horovod is initialised with a
plain ``hvd.init()`` (plain_init_worker.py), then shut down and initialised again with
``gtopk_hvd.torch.init()`` for the collective and optimizer scenarios.  One interpreter start
per world size keeps the suite fast on 2 cores (tests/jobs.py); the cross-framework cases
(tests/crossframework_cases.py) run here too, with ``--robustness`` (at P = 3) the
scenarios of robustness_worker.py and with ``--parity`` (P = 2, 3) Horovod's own optimizer
tests re-written for gTop-k (horovod_parity_worker.py).
"""
import os
import sys

import collective_worker
import compressor_worker
import horovod.torch as plain_hvd
import horovod_parity_worker
import optimizer_worker
import plain_init_worker
import robustness_worker
import torch
from _common import Recorder

import gtopk_hvd.torch as hvd
from tests import crossframework_cases


def main(robustness, parity):
    torch.set_num_threads(1)
    os.environ.pop("HOROVOD_DYNAMIC_PROCESS_SETS", None)
    plain_hvd.init()
    rank, size = hvd.rank(), hvd.size()
    rec = Recorder(rank)
    for scenario in plain_init_worker.SCENARIOS:
        scenario(hvd, rec, rank, size)
    hvd.shutdown()

    hvd.init()
    crossframework_cases.record(hvd, rec, rank, torch.from_numpy,
                                lambda t: t.detach().cpu().numpy())
    for scenario in (collective_worker.SCENARIOS + optimizer_worker.SCENARIOS
                     + compressor_worker.SCENARIOS):
        scenario(hvd, rec, rank, size)
    for scenario in robustness_worker.SCENARIOS if robustness else ():
        scenario(rec, rank, size)
    for scenario in horovod_parity_worker.SCENARIOS if parity else ():
        scenario(hvd, rec, rank, size)
    rec.save()
    hvd.shutdown()  # after a barrier: the extra ranks' last unfold must not be cut short


if __name__ == "__main__":
    main("--robustness" in sys.argv[1:], "--parity" in sys.argv[1:])
