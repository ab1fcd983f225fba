"""Hierarchical gTop-k with TensorFlow on emulated nodes (``horovodrun -H
localhost:2,127.0.0.1:2`` is two nodes of two ranks), every rank against the NumPy reference
(workers/hierarchical_worker.py): ``gtopk_allreduce``, the tape (eagerly and in a graph) and
the Keras optimizer.  2 x 2 always; 2 x 3, 3 x 2 and 4 x 2 under ``make test-stress``.  The
fallbacks (one host, one rank a host) are the core's decision and run in the PyTorch tests
(tests/torch/test_torch_hierarchical.py)."""
import os

import pytest

from tests.harness import check_scenario, emulated_hosts, horovodrun

WORKER = "tests/tensorflow/workers/hierarchical_worker.py"
LAYOUTS = [(2, 2)] + ([(2, 3), (3, 2), (4, 2)] if os.environ.get("GTOPK_TEST_STRESS") else [])


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda nl: f"{nl[0]}x{nl[1]}")
def job(request):
    nodes, local = request.param
    hosts = emulated_hosts(nodes, local)
    if hosts is None:
        pytest.skip(f"this machine has fewer than {nodes} names that resolve to it")
    return horovodrun(nodes * local, WORKER, hosts=hosts)


@pytest.mark.parametrize("scenario", [
    "hierarchical_allreduce_equals_the_reference_every_step",
    "hierarchical_allreduce_in_a_graph_equals_the_reference_every_step",
    "hierarchical_nan_on_one_rank_gives_nan_everywhere_residuals_kept",
    "hierarchical_on_some_ranks_only_is_refused_on_every_rank",
    *[f"hierarchical_tape_{mode}_{granularity}_equals_the_reference_every_step"
      for mode in ("eager", "graph") for granularity in ("model", "layer")],
    "hierarchical_keras_minimize_in_a_graph_equals_the_reference_every_step",
    *[f"hierarchical_compressor_in_horovods_tape_{mode}_equals_the_reference"
      for mode in ("eager", "graph")],
    *[f"hierarchical_{how}_loss_scale_bit_identical_and_an_overflow_skipped"
      for how in ("tape", "keras_inside")],
    *[f"hierarchical_tape_join_with_uneven_data_{m}_equals_the_reference"
      for m in ("eager", "graph")],
    *[f"hierarchical_tape_auto_eager_{link}_runs_the_mode_the_cost_model_chooses"
      for link in ("fast_node", "slow_node")],
    *[f"hierarchical_tape_auto_{mode}_switching_modes_moves_the_residuals_bit_for_bit"
      for mode in ("eager", "graph")],
    "hierarchical_tape_auto_dense_for_one_buffer_hierarchical_for_another_bit_for_bit",
    "hierarchical_tape_nan_on_one_rank_in_a_graph_gives_nan_everywhere_residuals_kept",
    "hierarchical_tape_of_another_model_on_one_rank_is_refused_in_a_graph",
    "hierarchical_tape_on_some_ranks_only_is_refused_on_every_rank",
    "hierarchical_checkpoint_resumes_the_shard_residuals_bit_for_bit",
    "hierarchical_tape_refuses_what_it_cannot_run"])
def test_hierarchical(job, scenario):
    check_scenario(job, scenario)
