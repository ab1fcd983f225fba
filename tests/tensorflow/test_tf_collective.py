"""gtopk_hvd.tensorflow.gtopk_allreduce under real ``horovodrun`` at P = 4 (two hypercube
stages), eagerly and inside tf.function; P = 2 (one stage) and P = 3 (a fold group: the
TensorFlow tape and robustness tests run it at P = 3 in ``make test``) under ``make
test-stress``.

One job per world size runs every scenario of workers/collective_worker.py; each scenario
asserts on every rank against the NumPy reference (gtopk_step / topk_allgather_step).
"""
import os

import pytest

from tests.harness import check_scenario, horovodrun

WORKER = "tests/tensorflow/workers/collective_worker.py"
SCENARIOS = [
    f"gtopk_random_d{d}_density{density}_{mode}_equals_reference"
    for mode in ("eager", "graph")
    for d, density in [(1000, 0.01), (4096, 0.003), (777, 0.1), (50, 0.5)]
] + [
    "gtopk_heavy_ties_integer_valued_eager_equals_reference",
    "gtopk_heavy_ties_integer_valued_graph_equals_reference",
    "gtopk_all_zero_input_selects_lowest_indices",
    "gtopk_large_buffer_random_eager_equals_reference",
    "gtopk_large_buffer_ties_graph_equals_reference",
    "gtopk_three_steps_with_residual_in_one_tf_function_equal_reference_iterated",
    "gtopk_two_independent_buffers_in_one_tf_function_equal_reference",
    "gtopk_op_sum_conserves_mass",
    "gtopk_density_1_equals_hvd_allreduce_eager",
    "gtopk_density_1_equals_hvd_allreduce_graph",
    "topk_allgather_random_eager_equals_reference",
    "topk_allgather_ties_graph_equals_reference",
    "gtopk_bytes_sent_follow_the_schedule_eager",
    "gtopk_bytes_sent_follow_the_schedule_graph",
    "gtopk_float16_input_float32_residual",
    "gtopk_bfloat16_input_float32_residual",
    "gtopk_bad_input_raises_then_collectives_still_work",
]


WORLD_SIZES = [2, 3, 4] if os.environ.get("GTOPK_TEST_STRESS") else [4]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"np{n}")
def results(request):
    return horovodrun(request.param, WORKER)


def test_worker_ran_exactly_the_listed_scenarios(results):
    for rank, res in enumerate(results):
        assert sorted(res) == sorted(SCENARIOS), f"rank {rank}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gtopk_allreduce(results, scenario):
    check_scenario(results, scenario)
