"""gTop-k Keras training under Horovod Elastic, with Horovod's own elastic driver on this
machine (tests/elastic_harness.py): 2 workers grow to 3, then the third is killed with
SIGKILL and the job goes on with 2 (workers/elastic_worker.py: ``model.fit`` with
``gtopk_hvd.tensorflow.keras.elastic``'s KerasState, run and callbacks).  The PyTorch
Elastic tests also run 3 -> 4 -> 3, where the world after a reset needs two-rank process
sets; TensorFlow's process sets come from the same core (gtopk_hvd.common), and a TensorFlow
start per worker is the cost of every extra rank here.

Checked from the workers' logs: training reaches the last step; after every step the
variables are bitwise the same on every rank of that world; every (re)start shows every rank
at the same schedule step; a worker that stays keeps its residuals across a reset and the new
worker starts from zero.
"""
from tests.elastic_harness import ROOT, check_elastic_run

WORKER = ROOT / "tests" / "tensorflow" / "workers" / "elastic_worker.py"
STEPS = 30


def test_keras_elastic_grow_then_kill_keeps_training_bit_identical():
    check_elastic_run(WORKER, STEPS, "gtopk", {"TF_USE_LEGACY_KERAS": "1",
                                                "TF_CPP_MIN_LOG_LEVEL": "3"}, base=2)


def test_keras_elastic_hierarchical_one_node_to_unequal_hosts_and_back():
    """hierarchical=True, 2 -> 3 -> 2: one host of two ranks (the node-only layout, each
    rank's residual a half of the buffer) grows by a worker on 127.0.0.1 (unequal hosts:
    flat gTop-k, residuals of the whole buffer), which is killed (one host again).  Each
    reset re-traces the Keras step, which registers the node sets of the new world and moves
    what each rank held back to its new place (GTopkState.reshard), what left a rank's
    part joining the next step's gradients; every check of the job above holds, the
    residual norm taken over residuals, shards and carries."""
    check_elastic_run(WORKER, STEPS, "gtopk", {"TF_USE_LEGACY_KERAS": "1",
                                                "TF_CPP_MIN_LOG_LEVEL": "3",
                                                "GTOPK_TEST_HIERARCHICAL": "1"}, base=2)
