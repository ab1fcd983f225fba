"""gtopk_allreduce under real ``horovodrun`` at P = 2, 3 (not a power of two) and 4.

Every scenario of workers/collective_worker.py runs in the job of conftest.py; each scenario
asserts on every rank against the NumPy reference (gtopk_step / topk_allgather_step).
"""
import pytest

from tests.harness import check_scenario

SCENARIOS = [
    "gtopk_random_d1000_density0.01_equals_reference",
    "gtopk_random_d4096_density0.003_equals_reference",
    "gtopk_random_d777_density0.1_equals_reference",
    "gtopk_random_d50_density0.5_equals_reference",
    "gtopk_heavy_ties_integer_valued_equals_reference",
    "gtopk_all_zero_input_selects_lowest_indices",
    "gtopk_large_buffer_random_equals_reference",
    "gtopk_large_buffer_ties_equals_reference",
    "gtopk_three_steps_with_residual_equal_reference_iterated",
    "gtopk_op_sum_conserves_mass",
    "gtopk_density_1_equals_hvd_allreduce",
    "topk_allgather_random_equals_reference",
    "topk_allgather_ties_equals_reference",
    "gtopk_bytes_sent_follow_the_schedule",
    "gtopk_float16_input_float32_residual",
    "gtopk_bfloat16_input_float32_residual",
    "gtopk_bad_input_raises_then_collectives_still_work",
    "in_place_gtopk_float32_equals_reference_and_writes_the_input",
    "in_place_topk_float32_equals_reference_and_writes_the_input",
    "in_place_gtopk_float32_noncontiguous_equals_reference_and_writes_the_input",
    "in_place_gtopk_float16_equals_reference_and_writes_the_input",
    "init_registers_every_pair_as_a_static_process_set",
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gtopk_allreduce(torch_job, scenario):
    check_scenario(torch_job, scenario)
