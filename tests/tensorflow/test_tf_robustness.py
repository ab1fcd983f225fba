"""gTop-k inside ordinary TensorFlow training programs under real ``horovodrun``
(workers/robustness_worker.py, every rank against the reference, eagerly and in tf.function):

- at P = 3 (an extra rank: a fold group and a hypercube stage), the world-size scenarios:
  unnamed collectives between steps, NaN / Inf on one rank, a variable without a gradient on
  some ranks, set-ups that differ, ``hvd.join()`` with uneven data; in the TensorFlow job
  that the tape's comparisons and the cross-framework cases share, which ends with Horovod's
  own shutdown, no barrier;
- at P = 2 (a core per rank), loss scaling, each rank's own arithmetic: the tape with
  ``loss_scale_optimizer=``, a LossScaleOptimizer around or inside DistributedOptimizer, a
  mixed_float16 fit; in the TensorFlow job of the other training scenarios.

Both jobs: workers/tf_worker.py, tests/jobs.py.
The world-size scenarios (not loss scaling, which is each rank's own arithmetic) also run at
P = 5 under ``make test-stress`` (``GTOPK_TEST_STRESS=1``): the stage loop and the step driver
are the core's, which tests/common runs at P = 1 to 8 and 11 and the PyTorch robustness tests
at P = 3, 5, 6 and 7 under horovodrun; here P = 5 costs 90 s of the suite on 2 cores.
"""
import os

import pytest

from tests import crossframework_cases, jobs
from tests.harness import check_scenario, horovodrun
from tests.tensorflow import test_tf_horovod_parity, test_tf_training

WORKER = "tests/tensorflow/workers/robustness_worker.py"
SCENARIOS = [
    *[f"tape_{m}_{a}unnamed_collectives_after_every_step" for m in ("eager", "graph")
      for a in ("", "auto_")],
    *[f"tape_{m}_{g}_nan_on_one_rank_gives_nan_everywhere_residuals_kept"
      for m in ("eager", "graph") for g in ("model", "layer")],
    *[f"tape_{m}_variable_without_gradient_on_some_ranks_counts_as_zero"
      for m in ("eager", "graph")],
    *[f"tape_{m}_mismatched_{w}_raises_on_every_rank"
      for m in ("eager", "graph") for w in ("density", "granularity")],
    "training_goes_on_after_a_refused_step",
    *[f"{how}_loss_scale_bit_identical_to_the_unscaled_run_across_scale_growth"
      for how in ("tape", "keras_outside", "keras_inside", "keras_inside_legacy")],
    *[f"{how}_overflow_on_one_rank_skips_one_step_everywhere"
      for how in ("tape", "keras_outside", "keras_inside", "keras_inside_legacy")],
    "keras_fit_mixed_float16_policy_wraps_the_gtopk_optimizer_and_trains",
    *[f"tape_{m}_join_with_uneven_data" for m in ("eager", "graph")],
    "keras_join_with_uneven_data_hands_over_momentum",
]


LOSS_SCALING = [s for s in SCENARIOS if "loss_scale" in s or "overflow" in s
                or "mixed_float16" in s]
WORLD = [s for s in SCENARIOS if s not in LOSS_SCALING]
WORLD_SIZES = [3, 5] if os.environ.get("GTOPK_TEST_STRESS") else [3]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"np{n}")
def results(request):
    """(every scenario the job ran, its per-rank records) for the world-size scenarios."""
    if request.param == 3:  # the TensorFlow job at P = 3 (tests/jobs.py)
        parity = test_tf_horovod_parity.SCENARIOS if os.environ.get("GTOPK_TEST_STRESS") else []
        return (WORLD + test_tf_training.EXCHANGE_SHAPE + crossframework_cases.NAMES + parity,
                jobs.tensorflow_job_p3())
    return WORLD, horovodrun(5, WORKER, "--world-size-only")


def test_worker_ran_exactly_the_listed_scenarios(results):
    scenarios, per_rank = results
    for rank, res in enumerate(per_rank):
        assert sorted(res) == sorted(scenarios), f"rank {rank}"


@pytest.mark.parametrize("scenario", WORLD)
def test_robustness(results, scenario):
    check_scenario(results[1], scenario)


@pytest.mark.parametrize("scenario", LOSS_SCALING)
def test_loss_scaling_at_p2(scenario):
    """Each rank's own arithmetic: in the TensorFlow job at P = 2 (tests/jobs.py)."""
    check_scenario(jobs.tensorflow_job_p2(), scenario)


def test_the_p2_job_ran_exactly_the_listed_scenarios():
    for rank, res in enumerate(jobs.tensorflow_job_p2()):
        assert sorted(res) == sorted(test_tf_training.OTHERS + LOSS_SCALING
                                     + test_tf_horovod_parity.SCENARIOS), f"rank {rank}"
