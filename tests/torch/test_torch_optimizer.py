"""gtopk_hvd.torch.DistributedOptimizer under real ``horovodrun`` at P = 2, 3 and 4.

Every scenario of workers/optimizer_worker.py runs in the job of conftest.py; every rank checks
its parameters, gradients and residuals against a simulation of all P ranks built on the
NumPy reference (workers/reference_sgd.py).
"""
import pytest

from tests.harness import check_scenario

SCENARIOS = [
    "plain_sgd_model_granularity_params_equal_reference_every_step",
    "plain_sgd_layer_granularity_params_equal_reference_every_step",
    "momentum_sgd_params_equal_reference_every_step",
    "plain_sgd_topk_algorithm_params_equal_reference_every_step",
    "adam_params_bitwise_identical_across_ranks",
    "density_1_equals_hvd_allreduce_on_integer_gradients",
    "backward_passes_per_step_accumulates_locally_then_equals_reference",
    "checkpoint_restore_continues_the_uninterrupted_trajectory",
    "load_from_other_world_size_drops_residuals_with_warning",
    "load_rank0_checkpoint_keeps_residuals_on_rank0_only",
    "parameters_without_grad_on_some_ranks_count_as_zero",
    "float16_and_bfloat16_gradients_float32_residuals",
    "sparse_embedding_without_sparse_as_dense_raises_before_communicating",
    "sparse_embedding_with_sparse_as_dense_equals_reference",
    "layer_granularity_with_dense_threshold_sends_small_tensors_dense",
    "density_schedule_and_statistics",
    "synchronize_then_skip_synchronize_equals_plain_step",
    "broadcast_optimizer_state_does_not_take_a_gtopk_step",
    "horovod_broadcast_optimizer_state_resume_idiom_no_deadlock_same_schedule_step",
    "gtopk_hvd_broadcast_optimizer_state_resume_idiom_no_deadlock_same_schedule_step",
    "horovod_broadcast_optimizer_state_on_a_stateless_optimizer_takes_no_gtopk_step",
    "gradient_predivide_factor_4_bit_identical_to_1_and_3_close",
    *[f"fp16_compression_{a}_{g}_params_equal_reference"
      for a, g in (("gtopk", "model"), ("gtopk", "layer"), ("topk", "model"))],
    "bad_arguments_raise_on_every_rank_then_training_works",
    "auto_with_a_given_link_bit_identical_to_the_dense_threshold_split_it_chose",
    "auto_measures_the_link_after_the_first_step_the_same_on_every_rank",
    "auto_buffer_that_turns_dense_applies_its_residual_in_full",
    "auto_nan_on_one_rank_after_the_first_step_gives_nan_everywhere_keeps_residuals",
    "auto_set_ups_that_differ_after_the_first_step_raise_plan_mismatch_everywhere",
    "auto_bad_input_is_refused_before_communicating",
    *[f"bucket_{c}_equal_reference_every_step_exchanged_during_backward"
      for c in ("eight_buckets_sgd", "three_buckets_momentum_two_passes")],
    "bucket_unused_parameter_and_synchronize_without_backward",
    "bucket_zero_grad_while_exchanging_is_refused_then_training_goes_on",
    "bucket_bad_arguments_are_refused_before_communicating",
    *[f"optimizer_subclass_with_colliding_attributes_{g}_keeps_them_and_equals_reference"
      for g in ("model", "bucket")],
    "lbfgs_with_a_closure_equals_reference_with_every_evaluation_synchronised",
    "gtopk_state_passed_in_holds_the_residuals_and_equals_reference",
    "adam_amsgrad_with_lambda_lr_equals_reference_every_step",
    "parameters_in_another_order_on_one_rank_are_refused_on_every_rank",
    "grad_scaler_not_passed_is_refused_on_every_rank_in_both_patterns",
    "nonfinite_warnings_count_the_synchronisations",
    *[f"freezing_and_unfreezing_a_parameter_keeps_every_residual_{g}"
      for g in ("model", "layer", "bucket")],
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distributed_optimizer(torch_job, scenario):
    check_scenario(torch_job, scenario)

