"""gTop-k under Horovod Elastic, with Horovod's own elastic driver on this machine: a job of
3 workers (host ``localhost``) grows to 4 (a worker on host ``127.0.0.1``; at P = 4 the
exchange needs two-rank process sets, at P = 3 none), then that worker is killed with SIGKILL
and the job goes on with 3, with Horovod's own ``horovod.torch.elastic.run``, whose reset
re-initialises Horovod without gtopk_hvd; and 2 -> 3 -> 2 the same way with
``gtopk_hvd.torch.elastic.run`` (workers/elastic_worker.py): once in ``make test``, five
times in a row under ``make test-stress``.

Checked from the workers' logs: training reaches the last step; after every step the
parameters are bitwise the same on every rank of that world (an unnamed allgather inside the
loop); every (re)start shows every rank at the same schedule step; a worker that stays keeps
its residual across a reset (the norm at the restart equals the norm at its last commit) and
the new worker starts from zero.
"""
import os

from tests.elastic_harness import ROOT, check_elastic_run

WORKER = ROOT / "tests" / "torch" / "workers" / "elastic_worker.py"
STEPS = 30


def test_elastic_grow_then_kill_keeps_training_bit_identical_horovod_run_bucket():
    """3 -> 4 -> 3 with Horovod's own ``elastic.run`` and granularity='bucket': a reset can
    come while exchanges started by the gradient hooks are in flight (the killed worker's
    partners fail inside loss.backward()).  gtopk_hvd's ``elastic.run`` with the model
    granularity runs below, 2 -> 3 -> 2."""
    check_elastic_run(WORKER, STEPS, "horovod", {"GTOPK_TEST_GRANULARITY": "bucket"})


def test_hierarchical_one_node_to_unequal_hosts_and_back_keeps_training_bit_identical():
    """hierarchical=True, 2 -> 3 -> 2 with gtopk_hvd's ``elastic.run``: one host of two ranks
    (the node-only layout, each rank's residual a half of the buffer) grows by a worker on
    127.0.0.1 (unequal hosts: flat gTop-k, residuals of the whole buffer), which is killed
    (one host again).  Every reset registers the node sets of the new world and re-shards
    the residuals (GTopkState.reshard), what left a rank's part joining the next step's
    gradients; every check of the jobs above holds, the residual norm taken over what each
    rank holds back (residuals and carry)."""
    check_elastic_run(WORKER, STEPS, "gtopk", {"GTOPK_TEST_HIERARCHICAL": "1"}, base=2)


def test_killing_the_worker_that_joined_2_3_2_recovers_within_10_s():
    """2 workers grown to 3 (the added one on host 127.0.0.1), that worker killed, 2 go on,
    with gtopk_hvd's ``elastic.run``: each time the survivors take their next step within
    10 s of the kill (Gloo's timeout is 60 s: a survivor left waiting on the dead peer fails
    this every time) and every check of the 3 -> 4 -> 3 job holds.  A stall here was
    intermittent, so ``make test-stress`` runs five jobs in a row
    (``GTOPK_TEST_ELASTIC_REPEAT``; one in ``make test``, 15 s).  Measured on the 2-core
    machine: 0.18 to 0.66 s in nine jobs (2026-12-06)."""
    recoveries = [check_elastic_run(WORKER, STEPS, "gtopk", base=2, recovery_bound=10)
                  for _ in range(int(os.environ.get("GTOPK_TEST_ELASTIC_REPEAT", "1")))]
    print("recovery after the kill, s:", [round(r, 2) for r in recoveries])
