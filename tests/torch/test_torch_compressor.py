"""``horovod.torch.DistributedOptimizer`` with ``compression=gtopk_hvd.torch.Compression.gtopk``
under real ``horovodrun`` at P = 2, 3 and 4 (workers/compressor_worker.py, run in the job of
conftest.py): every rank checks its parameters and residuals against the layer-granularity
reference, bit for bit.
"""
import pytest

from tests.harness import check_scenario

SCENARIOS = [
    *[f"horovod_optimizer_{tag}_params_equal_layer_reference_every_step"
      for tag in ("gtopk_sgd", "gtopk_momentum", "topk_sgd", "gtopk_horovod_groups",
                  "gtopk_backward_passes_2")],
    "horovod_optimizer_parameters_without_grad_on_some_ranks_count_as_zero",
    "horovod_optimizer_unnamed_collectives_between_steps_still_match",
    "horovod_optimizer_nan_on_one_rank_gives_nan_everywhere_residuals_kept",
    "horovod_optimizer_mismatched_density_raises_on_every_rank",
    "hvd_allreduce_with_gtopk_compression_equals_gtopk_allreduce",
    "compressor_state_dict_round_trip_continues_the_trajectory",
    "gtopk_compressor_refused_by_gtopk_optimizer_and_bad_arguments_rejected",
    "horovod_optimizer_over_a_process_set_subset_refuses_the_compressor_no_deadlock",
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_horovod_optimizer_with_gtopk_compressor(torch_job, scenario):
    check_scenario(torch_job, scenario)
