"""Horovod started with a plain hvd.init() (no dynamic process sets), at P = 2, 3 and 4.

gTop-k's exchange sets cannot be registered there: for P >= 4 the optimizer and
gtopk_allreduce must raise ProcessSetError on every rank, naming the fix; for P = 2 and 3 the
only group is the global set and both work; algorithm="topk" (global set only) always
works.  The scenarios run first in the job of conftest.py (workers/plain_init_worker.py).  This module also checks that the job
ran exactly the scenarios the torch test modules and the cross-framework test expect.
"""
import pytest

from tests import crossframework_cases, jobs
from tests.harness import check_scenario
from tests.torch import (test_torch_collective, test_torch_compressor,
                         test_torch_horovod_parity, test_torch_optimizer, test_torch_robustness)

SCENARIOS = [
    "plain_init_optimizer_raises_process_set_error_unless_p2_or_3",
    "plain_init_gtopk_allreduce_raises_process_set_error_unless_p2_or_3",
    "plain_init_topk_algorithm_needs_no_exchange_sets",
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_plain_hvd_init(torch_job, scenario):
    check_scenario(torch_job, scenario)


def test_job_ran_exactly_the_listed_scenarios(torch_job):
    expected = sorted(SCENARIOS + crossframework_cases.NAMES + test_torch_collective.SCENARIOS
                      + test_torch_optimizer.SCENARIOS + test_torch_compressor.SCENARIOS
                      + (test_torch_robustness.SCENARIOS
                         if len(torch_job) in jobs.ROBUSTNESS_IN_TORCH_JOB else [])
                      + (test_torch_horovod_parity.SCENARIOS
                         if len(torch_job) in jobs.PARITY_IN_TORCH_JOB else []))
    for rank, res in enumerate(torch_job):
        assert sorted(res) == expected, f"rank {rank}"
