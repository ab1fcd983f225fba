"""DistributedGradientTape and the Keras DistributedOptimizer under real ``horovodrun``: the
tape's reference comparisons (``EXCHANGE_SHAPE`` in the worker, whose subject is the shape of
the exchange) at P = 3 (a fold group and a hypercube stage; two pure hypercube stages, P = 4,
run in the TensorFlow collective tests and, for the tape, under ``make test-stress``),
every other scenario (checkpoints, Keras formats, predivide, fp16, ``auto``, Horovod's own
optimizers with the Compressor: each rank's own arithmetic around the same step) at P = 2,
where two ranks have a core each.  The step is the core's (gtopk_hvd.common.step) and the
exchange the core's stage loop, which the TensorFlow collective tests run at P = 2, 3 and 4
and tests/common at P = 1 to 8 and 11.  On the 2-core machine the P = 3 job of every scenario
took 176 s; the P = 2 job takes 80 s, the P = 3 job of the comparisons 19 s.

The scenarios of workers/training_worker.py run in the two TensorFlow jobs of tests/jobs.py
(workers/tf_worker.py), which the robustness and cross-framework tests share: P = 3 for the
comparisons, P = 2 for the rest (at P = 4 under make test-stress, training_worker.py alone).
Every rank checks its gradients, variables and residuals against a simulation of all P ranks
built on the NumPy reference (workers/reference_steps.py), or that the variables are bitwise
the same on every rank where the loss is a real one.
"""
import os

import pytest

from tests import jobs
from tests.harness import check_scenario, horovodrun

WORKER = "tests/tensorflow/workers/training_worker.py"
SCENARIOS = [
    "tape_eager_model_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_model_gtopk_gradients_and_residuals_equal_reference",
    "tape_eager_layer_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_layer_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_model_topk_gradients_and_residuals_equal_reference",
    "tape_density_1_equals_hvd_allreduce_on_integer_gradients",
    "tape_registered_local_source_is_not_communicated_and_is_scaled",
    "tape_layer_granularity_dense_threshold_sends_small_tensors_dense",
    "tape_layer_granularity_one_allgather_per_stage_for_all_tensors",
    "tape_density_schedule_advances_inside_one_tf_function",
    "tape_mlp_adam_variables_bitwise_identical_across_ranks",
    "tape_checkpoint_restore_continues_the_uninterrupted_trajectory",
    "tape_checkpoint_from_other_world_size_drops_residuals_with_warning",
    *[f"tape_{m}_{g}_excluded_variables_keep_their_residuals"
      for m, g in (("eager", "model"), ("graph", "layer"))],
    "tape_indexed_slices_need_sparse_as_dense_then_equal_reference",
    "keras_sgd_minimize_equals_reference_every_step",
    "keras_legacy_sgd_minimize_equals_reference_every_step",
    "keras_backward_passes_per_step_2_accumulates_locally_then_equals_reference",
    "keras_fit_broadcast_metric_average_stats_and_schedule_callbacks",
    "keras_save_weights_load_weights_continues_the_uninterrupted_trajectory",
    "keras_load_model_rewraps_gtopk_in_keras_h5_and_savedmodel_formats",
    "gradient_predivide_factor_4_bit_identical_to_1_and_3_close",
    *[f"tape_{m}_{g}_{a}_fp16_compression_equals_reference"
      for m, g, a in [("eager", "model", "gtopk"), ("graph", "layer", "gtopk"),
                      ("graph", "model", "topk")]],
    "bad_arguments_raise_on_every_rank_then_training_works",
    *[f"tape_{m}_auto_with_a_given_link_equals_reference_of_the_split_it_chose"
      for m in ("eager", "graph")],
    "tape_auto_measures_the_link_after_the_first_eager_step_the_same_on_every_rank",
    "tape_auto_buffer_that_turns_dense_applies_its_residual_in_full",
    "tape_auto_nan_on_one_rank_gives_nan_everywhere_and_keeps_the_residuals",
    "tape_auto_set_ups_that_differ_raise_plan_mismatch_on_every_rank",
    "tape_auto_after_a_first_eager_step_the_dense_allreduce_carries_the_verdict",
    "tape_auto_set_ups_that_differ_after_the_first_step_raise_plan_mismatch",
    "tape_auto_bad_input_is_refused_before_communicating",
    # horovod.tensorflow's own tape and Keras optimizer with Compression.gtopk
    *[f"horovod_tape_{m}_{a}_compressor_equals_layer_reference"
      for m, a in [("eager", "gtopk"), ("graph", "gtopk"), ("graph", "topk")]],
    "horovod_keras_optimizer_compressor_equals_layer_reference",
    "horovod_keras_legacy_optimizer_compressor_equals_layer_reference",
    "horovod_keras_fit_with_compressor_trains_identically_on_every_rank",
    "horovod_tape_compressor_nan_on_one_rank_gives_nan_everywhere_residuals_kept",
    "tf_hvd_allreduce_with_gtopk_compression_equals_gtopk_allreduce",
]


EXCHANGE_SHAPE = [  # the records of the worker's EXCHANGE_SHAPE scenarios
    "tape_eager_model_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_model_gtopk_gradients_and_residuals_equal_reference",
    "tape_eager_layer_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_layer_gtopk_gradients_and_residuals_equal_reference",
    "tape_graph_model_topk_gradients_and_residuals_equal_reference",
    "tape_layer_granularity_one_allgather_per_stage_for_all_tensors",
]
OTHERS = [s for s in SCENARIOS if s not in EXCHANGE_SHAPE]  # the P = 2 job

WORLD_SIZES = [2, 3, 4] if os.environ.get("GTOPK_TEST_STRESS") else [2, 3]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"np{n}")
def results(request):
    """(scenarios, per-rank records): at P = 2 and 3 from the TensorFlow jobs of tests/jobs.py,
    which run the robustness scenarios too (test_tf_robustness.py lists each job in full)."""
    if request.param == 2:
        return OTHERS, jobs.tensorflow_job_p2()
    if request.param == 3:
        return EXCHANGE_SHAPE, jobs.tensorflow_job_p3()
    return EXCHANGE_SHAPE, horovodrun(request.param, WORKER, "--exchange-only")


def test_worker_ran_the_listed_scenarios(results):
    scenarios, per_rank = results
    for rank, res in enumerate(per_rank):
        assert set(scenarios) <= set(res), f"rank {rank}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_training(results, scenario):
    scenarios, per_rank = results
    if scenario not in scenarios:
        pytest.skip("the tape's reference comparisons run at P = 3 (and 4 under make test-stress), "
                    "the rest at P = 2")
    check_scenario(per_rank, scenario)
