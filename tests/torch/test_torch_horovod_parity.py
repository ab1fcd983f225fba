"""Horovod v0.28.1's own optimizer tests (test/parallel/test_torch.py), re-written for gTop-k
at density 1 and run at P = 2 and 3 inside the torch job (workers/horovod_parity_worker.py).

Each behaviour runs with Horovod's own optimizer (the oracle), the drop-in
``gtopk_hvd.torch.DistributedOptimizer`` and Horovod's optimizer with
``Compression.gtopk(density=1.0)``; every rank asserts its own checks and that the drop-in and
the Compressor agree with the oracle bit for bit (docs/compatibility.md lists what each
Horovod test became).
"""
import pytest

from tests import jobs
from tests.harness import check_scenario
from tests.parity_cases import MODES

BEHAVIOURS = ["broadcast_state", "broadcast_state_options", "broadcast_state_no_grad",
              "force_allreduce", "dynamic_requires_grad", "gradient_clipping",
              "no_named_parameters", "duplicate_and_missing_names", "sparse_embeddings"]
AGREEMENT = {"broadcast_state": "broadcast_state_steps_agree_with_horovod",
             "broadcast_state_options": "broadcast_state_options_second_step_agrees_with_horovod",
             "force_allreduce": "force_allreduce_agrees_with_horovod",
             "dynamic_requires_grad": "dynamic_requires_grad_agrees_with_horovod",
             "gradient_clipping": "gradient_clipping_agrees_with_horovod",
             "no_named_parameters": "no_named_parameters_agrees_with_horovod",
             "sparse_embeddings": "sparse_embeddings_agree_with_horovod"}
SCENARIOS = ([f"horovod_test_{b}_{m}" for b in BEHAVIOURS for m in MODES]
             + [f"horovod_test_{a}" for a in AGREEMENT.values()])


@pytest.fixture(scope="module", params=sorted(jobs.PARITY_IN_TORCH_JOB), ids=lambda n: f"np{n}")
def parity_job(request):
    return jobs.torch_job(request.param)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_horovod_parity(parity_job, scenario):
    check_scenario(parity_job, scenario)


def test_every_optimizer_of_horovods_list_was_tried(parity_job):
    for mode in MODES:
        records = check_scenario(parity_job, f"horovod_test_broadcast_state_{mode}")
        names = records[0]["optimizers"]
        assert {"SGD", "Adam", "Adagrad", "RMSprop", "Adadelta"} <= set(names), names
        assert all(r["optimizers"] == names for r in records)
