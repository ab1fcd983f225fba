"""gTop-k under Horovod Elastic, with Horovod's own elastic driver on this machine: a job of
3 workers (host ``localhost``) grows to 4 (a worker on host ``127.0.0.1``; at P = 4 the
exchange needs two-rank process sets, at P = 3 none), then that worker is killed with SIGKILL
and the job goes on with 3 (workers/elastic_worker.py); with
``gtopk_hvd.torch.elastic.run`` and with Horovod's own ``horovod.torch.elastic.run``, whose
reset re-initialises Horovod without gtopk_hvd.

Checked from the workers' logs: training reaches the last step; after every step the
parameters are bitwise the same on every rank of that world (an unnamed allgather inside the
loop); every (re)start shows every rank at the same schedule step; a worker that stays keeps
its residual across a reset (the norm at the restart equals the norm at its last commit) and
the new worker starts from zero.
"""
import pytest

from tests.elastic_harness import ROOT, check_elastic_run

WORKER = ROOT / "tests" / "torch" / "workers" / "elastic_worker.py"
STEPS = 30


@pytest.mark.parametrize("run,granularity", [("gtopk", "model"), ("horovod", "bucket")])
def test_elastic_grow_then_kill_keeps_training_bit_identical(run, granularity):
    """With granularity='bucket' a reset can come while exchanges started by the gradient
    hooks are in flight (the killed worker's partners fail inside loss.backward())."""
    check_elastic_run(WORKER, STEPS, run, {"GTOPK_TEST_GRANULARITY": granularity})
