"""Hierarchical gTop-k with PyTorch on nodes emulated by horovodrun's host list: every name in
``-H`` that resolves to this machine runs here, grouped as a host of its own, so
``localhost:2,127.0.0.1:2`` is two nodes of two ranks (local and cross ranks as on two
machines).  2 x 3 runs hierarchically (it puts members of one process set at different local
ranks on the two hosts, which hung Horovod's init before the seventh Horovod patch,
docs/building.md), 1 x 3 is the node-only case (one host), 3 x 1 and 2 + 1 (unequal hosts)
fall back to flat gTop-k, the same on every rank; 2 x 2 (also TensorFlow's layout in make test), 3 x 2 and 4 x 2
(three and four host names: ``tests.harness.emulated_hosts`` adds the host name and the
interfaces' addresses) run under ``make test-stress``.  Every rank
against the NumPy reference (workers/hierarchical_worker.py)."""
import os

import pytest

from tests.harness import check_scenario, emulated_hosts, horovodrun

WORKER = "tests/torch/workers/hierarchical_worker.py"
LAYOUTS = {  # (nodes, ranks a node): (ranks, horovodrun -H, the mode gTop-k runs in)
    (1, 3): (3, "localhost:3", "node"),
    (3, 1): (3, emulated_hosts(3, 1), "flat"),
    (2, 3): (6, "localhost:3,127.0.0.1:3", "hierarchical"),
    ("2+1",): (3, "localhost:2,127.0.0.1:1", "flat"),  # unequal hosts: the flat fallback
}
if os.environ.get("GTOPK_TEST_STRESS"):  # TensorFlow's hierarchical test runs 2 x 2 always
    LAYOUTS[(2, 2)] = (4, "localhost:2,127.0.0.1:2", "hierarchical")
    LAYOUTS[(3, 2)] = (6, emulated_hosts(3, 2), "hierarchical")
    LAYOUTS[(4, 2)] = (8, emulated_hosts(4, 2), "hierarchical")  # 8 ranks on this machine
SCENARIOS = [
    "hierarchical_allreduce_equals_the_reference_every_step",
    "hierarchical_nan_on_one_rank_gives_nan_everywhere_residuals_kept",
    "hierarchical_density_1_is_the_dense_sum",
    "hierarchical_bad_residual_is_refused_before_communicating",
    *[f"hierarchical_optimizer_{g}_equals_the_reference_every_step" for g in ("model", "layer")],
    "hierarchical_optimizer_bucket_equals_the_reference_exchanged_during_backward",
    "hierarchical_carry_of_a_layout_change_joins_the_next_step_and_nothing_is_lost",
    "hierarchical_auto_runs_the_mode_the_cost_model_chooses_bit_for_bit",
    "hierarchical_auto_dense_for_one_buffer_hierarchical_for_another_bit_for_bit",
    "hierarchical_compressor_equals_the_reference_every_step",
    "hierarchical_checkpoint_keeps_the_shard_residuals_for_its_own_layout_only",
    "hierarchical_optimizer_refuses_what_it_cannot_run",
    "hierarchical_on_some_ranks_only_is_refused_on_every_rank",
]
NOT_FLAT = [  # a layout that falls back to flat runs test_torch_robustness.py's own
    "hierarchical_join_with_uneven_data_equals_the_reference",
    "hierarchical_grad_scaler_bit_identical_to_the_unscaled_run_across_scale_growth",
    "hierarchical_grad_scaler_overflow_on_one_rank_skips_one_step_everywhere",
]


@pytest.fixture(scope="module", params=list(LAYOUTS),
                ids=lambda nl: "x".join(str(n) for n in nl))
def job(request):
    ranks, hosts, mode = LAYOUTS[request.param]
    if hosts is None:
        pytest.skip(f"this machine has fewer than {request.param[0]} names that resolve to it "
                    "(localhost, 127.0.0.1, its host name, its interfaces' addresses)")
    return request.param, mode, horovodrun(ranks, WORKER, hosts=hosts)


def test_the_layout_is_the_one_horovod_reports(job):
    key, mode, results = job
    ranks = LAYOUTS[key][0]
    for rec in check_scenario(results, "layout"):
        assert rec["layout"] == ((ranks, 1) if mode == "flat" else key) + (mode,), rec


@pytest.mark.parametrize("scenario", SCENARIOS + NOT_FLAT)
def test_hierarchical(job, scenario):
    if job[1] == "flat" and scenario in NOT_FLAT:
        pytest.skip("flat gTop-k: tests/torch/test_torch_robustness.py runs it")
    check_scenario(job[2], scenario)
