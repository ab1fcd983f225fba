"""Horovod v0.28.1's own tape and Keras tests (test/parallel/test_tensorflow2_keras.py and
the tape tests of test_tensorflow.py), re-written for gTop-k at density 1 and run in the
TensorFlow job at P = 2, and at P = 3 too under ``make test-stress`` (30 s more; the torch
parity scenarios run at P = 3 in ``make test``) (workers/horovod_parity_worker.py).

Each behaviour runs with Horovod's own optimizer or tape (the oracle), the drop-in (gtopk_hvd)
and Horovod's with ``Compression.gtopk(density=1.0)``; every rank asserts its own checks and
that the drop-in and the Compressor agree with the oracle bit for bit (docs/compatibility.md
lists what each Horovod test became).
"""
import os

import pytest

from tests import jobs
from tests.harness import check_scenario
from tests.parity_cases import MODES

SCENARIOS = (
    [f"horovod_test_{b}_{m}" for b in ("partial_distributed_gradient_tape",
                                        "train_model_lr_schedule", "sparse_as_dense",
                                        "from_config", "elastic_state") for m in MODES]
    + [f"horovod_test_gradient_aggregation_{a}_{m}" for a in ("average", "sum") for m in MODES
       if (a, m) != ("sum", "compressor")]
    + [f"horovod_test_{b}_agrees_with_horovod" for b in (
        "partial_distributed_gradient_tape", "train_model_lr_schedule", "sparse_as_dense",
        "gradient_aggregation")]
    + ["horovod_test_broadcast_callback_with_local_vars_drop_in"])


@pytest.fixture(scope="module", params=[2, 3] if os.environ.get("GTOPK_TEST_STRESS") else [2],
                ids=lambda n: f"np{n}")
def parity_job(request):
    return jobs.tensorflow_job_p2() if request.param == 2 else jobs.tensorflow_job_p3()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_horovod_parity(parity_job, scenario):
    check_scenario(parity_job, scenario)


def test_learning_rates_follow_the_warmup_and_schedules(parity_job):
    """Every mode saw the same learning rate each epoch (checked on every rank), and they
    follow Horovod's callbacks: warm-up to 0.125 P, then x0.1, x0.01 and x epoch."""
    size = len(parity_job)
    records = check_scenario(parity_job, "horovod_test_train_model_lr_schedule_drop_in")
    rates = records[0]["rates"]
    assert len(rates) == 8, rates
    initial = 0.125 * size
    # inside each schedule (Horovod's test skips the boundary epochs too)
    assert rates[3] == pytest.approx(initial * 0.1)
    assert rates[5] == pytest.approx(initial * 0.01)
    assert rates[6:] == pytest.approx([initial * 6, initial * 7])
    assert all(r["rates"] == rates for r in records)
