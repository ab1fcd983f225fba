"""One real multi-process job per world size for all torch tests (P = 2, 3, 4).

workers/torch_worker.py runs every scenario under ``horovodrun -np N`` and each rank records
its outcome; the test modules check their scenarios on every rank with check_scenario.  The
fixture is session-scoped so the three modules share the three jobs.
"""
import pytest

from tests.harness import horovodrun

WORKER = "tests/torch/workers/torch_worker.py"


@pytest.fixture(scope="session", params=[2, 3, 4], ids=lambda n: f"np{n}")
def torch_job(request):
    return horovodrun(request.param, WORKER)
