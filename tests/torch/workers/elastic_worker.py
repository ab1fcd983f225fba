"""Elastic training with gTop-k under Horovod's elastic driver (horovodrun --host-discovery-script).

Run by test_torch_elastic.py, which grows the job from 3 to 4 workers and then kills one;
with gtopk_hvd's ``hvd.elastic.run`` or Horovod's own (second argument).
Every process appends one JSON line per event to ``$GTOPK_ELASTIC_OUT/<pid>.jsonl``:
``start`` when ``train`` (re)starts after a sync (world, residual norm, schedule step), and
``step`` after each step (world, a digest of the parameters, whether they are bitwise the same
on every rank, the residual norm).  Steps are slowed down until the world shrinks
(tests.elastic_harness.Pace), so that it changes mid-run.
"""
import json
import math
import os
import socket
import sys
import time
import zlib

import torch

import gtopk_hvd.torch as hvd
from gtopk_hvd.common import StepwiseDensity
from tests.elastic_harness import Pace

TOTAL_STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
# "gtopk": gtopk_hvd.torch.elastic.run; "horovod": Horovod's own horovod.torch.elastic.run
# (its reset calls a plain hvd.init()) with the gTop-k optimizer
RUN = sys.argv[2] if len(sys.argv) > 2 else "gtopk"
OUT = os.environ["GTOPK_ELASTIC_OUT"]
# granularity="bucket" (3 buckets, exchanged during backward) when the test asks for it
BUCKETS = {"granularity": "bucket", "bucket_cap_mb": 1e-4} \
    if os.environ.get("GTOPK_TEST_GRANULARITY") == "bucket" else {}
# hierarchical=True when the test asks for it: the hosts' layout changes with every reset
HIERARCHICAL = os.environ.get("GTOPK_TEST_HIERARCHICAL") == "1"


def log(**event):
    event.update(pid=os.getpid(), host=os.environ.get("HOROVOD_HOSTNAME", socket.gethostname()),
                 time=time.time())
    with open(os.path.join(OUT, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\n")


def residual_norm(opt):
    """The squared norm of everything this rank holds back: its residuals and what a layout
    change carries into the next step (hierarchical), summed exactly (math.fsum of exact
    squares), so that the same entries give the same number however they are split."""
    state = opt.gtopk_state
    held = list(state.residuals.values()) + list(state.carry.values())
    return math.fsum(v * v for e in held for v in e.double().tolist())


def main():
    torch.set_num_threads(1)
    hvd.init(hierarchical=HIERARCHICAL)
    torch.manual_seed(1234)  # the same start everywhere; the sync makes it so anyway
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
        named_parameters=model.named_parameters(),
        density=StepwiseDensity([0.2, 0.05], steps_per_epoch=10), hierarchical=HIERARCHICAL,
        **BUCKETS)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, batch=0)
    pace = Pace()

    if RUN == "horovod":
        import horovod.torch.elastic
        run = horovod.torch.elastic.run
    else:
        run = hvd.elastic.run

    @run
    def train(state):
        log(kind="start", size=hvd.size(), rank=hvd.rank(), batch=state.batch,
            gtopk_step=opt.gtopk_stats()["step"], residual_norm=residual_norm(opt))
        while state.batch < TOTAL_STEPS:
            g = torch.Generator().manual_seed(state.batch * 131 + hvd.rank())
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            rows = hvd.allgather(flat.view(torch.int32).reshape(1, -1))  # unnamed, as users do
            state.batch += 1
            log(kind="step", size=hvd.size(), rank=hvd.rank(), batch=state.batch,
                digest=zlib.crc32(flat.numpy().tobytes()),
                same=bool((rows == rows[0]).all()), gtopk_step=opt.gtopk_stats()["step"],
                residual_norm=residual_norm(opt))
            pace(hvd.size())
            state.commit()
    train(state)
    log(kind="done", batch=state.batch)


if __name__ == "__main__":
    main()
