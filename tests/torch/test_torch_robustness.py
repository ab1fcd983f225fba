"""gTop-k inside ordinary PyTorch training programs, under real ``horovodrun`` (issue: safe in
real training programs).

- P = 3 and 6 (one extra rank and one stage, two extra ranks and two stages; P = 5 and 7 too
  under `make test-stress`): unnamed collectives between steps, NaN / Inf on one rank,
  GradScaler, set-ups that differ (workers/robustness_worker.py; every rank checks itself
  against the reference or against the other ranks); at P = 3 inside the torch job that the
  other torch modules share (tests/jobs.py), which ends after a barrier, at the others in
  jobs of their own, which end with Horovod's own shutdown;
- P = 3: a plain ``hvd.shutdown()`` or a plain exit right after the last step (once each;
  ten times each with GTOPK_TEST_REPEAT=10, `make test-stress`);
- P = 3 and 4: a rank killed with SIGKILL (rank 0, a stage partner; under `make test-stress`
  the fold group's extra rank too); the survivors catch HorovodInternalError.
"""
import os

import pytest

from tests import jobs
from tests.harness import check_scenario, horovodrun

WORKER = "tests/torch/workers/robustness_worker.py"
SCENARIOS = [
    *[f"unnamed_collectives_after_every_step_{g}" for g in ("model", "layer", "bucket")],
    *[f"nonfinite_on_one_rank_skipped_everywhere_residuals_kept_{g}_{v}"
      for g in ("model", "layer", "bucket") for v in ("nan", "inf")],
    "grad_scaler_bit_identical_to_the_unscaled_run_across_scale_growth",
    "grad_scaler_overflow_on_one_rank_skips_one_step_everywhere",
    *[f"grad_scaler_unscaled_before_synchronize_is_refused{g}" for g in ("", "_layer", "_bucket")],
    *[f"mismatched_{w}_raises_on_every_rank"
      for w in ("density", "granularity", "dense_threshold", "bucket_cap_mb",
                "granularity_bucket", "parameter_order", "shape")],
    "mismatched_density_at_the_third_overlapped_bucket_step_raises_on_every_rank",
    "training_goes_on_after_a_refused_step",
    *[f"join_with_uneven_data_{g}" for g in ("model", "layer", "bucket")],
]


# make test: one extra rank and one stage (P = 3), two extra ranks and two stages (P = 6);
# make test-stress adds one extra and two stages (5) and three extras (7)
WORLD_SIZES = [3, 5, 6, 7] if os.environ.get("GTOPK_TEST_STRESS") else [3, 6]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"np{n}")
def robustness_job(request):
    """Per-rank records: at P = 3 of the torch job (tests/jobs.py), which runs these scenarios
    after its own (test_torch_process_sets.py lists it in full), else of a job of its own."""
    if request.param in jobs.ROBUSTNESS_IN_TORCH_JOB:
        return jobs.torch_job(request.param)
    return horovodrun(request.param, WORKER)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_robustness(robustness_job, scenario):
    check_scenario(robustness_job, scenario)


def test_job_ran_exactly_the_listed_scenarios(robustness_job):
    for rank, res in enumerate(robustness_job):
        if len(robustness_job) in jobs.ROBUSTNESS_IN_TORCH_JOB:
            assert set(SCENARIOS) <= set(res), f"rank {rank}"
        else:
            assert sorted(res) == sorted(SCENARIOS), f"rank {rank}"


# a race shows up now and then: once each in `make test`, ten times in `make test-stress`
REPEAT = int(os.environ.get("GTOPK_TEST_REPEAT", "1"))


@pytest.mark.parametrize("how", ["shutdown", "exit"])
def test_plain_shutdown_or_exit_after_the_last_step_at_p3_repeated(how):
    for run in range(REPEAT):
        results = horovodrun(3, "tests/torch/workers/shutdown_worker.py", how, attempts=1)
        check_scenario(results, "train_then_exit")


# the coordinator (rank 0) and a hypercube partner in make test; the extra rank of a fold
# group too under make test-stress
@pytest.mark.parametrize("size,victim", [(3, 2), (3, 0), (4, 1)] if os.environ.get(
    "GTOPK_TEST_STRESS") else [(3, 0), (4, 1)])
def test_killed_rank_makes_the_survivors_raise_horovod_internal_error(size, victim):
    results = horovodrun(size, "tests/torch/workers/kill_worker.py", victim, attempts=1,
                         survivors=True, env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "30"})
    assert results[victim] is None
    for rank, res in enumerate(results):
        if rank != victim:
            assert res is not None, f"survivor {rank} recorded nothing (aborted?)"
            rec = check_scenario([res], "survivor_catches_horovod_internal_error")[0]
            assert rec["seconds"] < 60, rec
