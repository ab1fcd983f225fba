"""One real multi-process job per world size for all torch tests (P = 2, 3, 4).

workers/torch_worker.py runs every scenario under ``horovodrun -np N`` and each rank records
its outcome; the test modules check their scenarios on every rank with check_scenario.  The
fixture is session-scoped so the modules share the three jobs, and tests/jobs.py keeps them
for the cross-framework test (tests/tensorflow/test_tf_cross_framework.py) too.
"""
import pytest

from tests import jobs


@pytest.fixture(scope="session", params=[2, 3, 4], ids=lambda n: f"np{n}")
def torch_job(request):
    return jobs.torch_job(request.param)
