"""The alpha-beta cost model (gtopk_hvd.common.cost) against ALGORITHM.md's table, its fit,
and what ``algorithm="auto"`` builds on it (Link, choose_methods, measure_link)."""
import math
import time

import pytest

from gtopk_hvd.common.cost import (Cost, Link, as_link, buffer_methods, choose_methods,
                                   cost_of, describe_methods, dense_allreduce_cost,
                                   fit_alpha_beta, gtopk_cost, gtopk_stages, measure_link,
                                   method_costs, node_costs, round_costs, topk_allgather_cost)
from gtopk_hvd.common.density import k_for


@pytest.mark.parametrize("size", [2, 4, 8, 16])
def test_volumes_match_the_algorithm_table_for_powers_of_two(size):
    d, k = 1_000_000, 1000
    log_p = math.log2(size)
    assert dense_allreduce_cost(d, size) == Cost(2 * (size - 1), 2 * (size - 1) / size * 4 * d)
    assert topk_allgather_cost(k, size) == Cost(log_p, (size - 1) * 8 * k)
    assert gtopk_cost(k, size) == Cost(log_p, log_p * 8 * k)


def test_gtopk_sends_less_than_topk_from_four_workers_on():
    k = 25_000
    assert gtopk_cost(k, 2).bytes == topk_allgather_cost(k, 2).bytes
    for size in (4, 8, 32):
        assert gtopk_cost(k, size).bytes < topk_allgather_cost(k, size).bytes


def test_gtopk_groups_with_extra_ranks_cost_ring_steps_when_size_is_not_a_power_of_two():
    k = 10
    # P = 6: stage 0 in {0, 1, 4, 5} (3 ring steps, 3 blocks leave rank 0), stage 1 in
    # {0, 2, 4} where mirror 4 sends a header only (2 steps, 1 block leaves rank 0)
    assert gtopk_cost(k, 6) == Cost(5, 4 * 8 * k)
    assert gtopk_cost(k, 6, rank=4) == Cost(5, 4 * 8 * k)
    # every rank runs the same number of exchanges: floor(log2 P)
    assert gtopk_stages(6) == 2 and gtopk_stages(8) == 3 and gtopk_stages(1) == 0
    # rank 3: a pair {2, 3}, then {1, 3, 5} whose right neighbour 5 sends no entries
    assert gtopk_cost(k, 6, rank=3) == Cost(3, 3 * 8 * k)


def test_single_worker_costs_nothing():
    assert dense_allreduce_cost(100, 1) == Cost(0, 0)
    assert gtopk_cost(5, 1) == Cost(0, 0)
    assert topk_allgather_cost(5, 1) == Cost(0, 0)


def test_cost_of_uses_k_from_density():
    assert cost_of("gtopk", 25_000_000, 0.001, 4) == gtopk_cost(25_000, 4)
    assert cost_of("topk", 1000, 0.0001, 8) == topk_allgather_cost(1, 8)  # k >= 1
    assert cost_of("dense", 10, 0.5, 2) == dense_allreduce_cost(10, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        cost_of("ring", 10, 0.5, 2)


def test_time_is_messages_times_alpha_plus_bytes_times_beta():
    assert Cost(3, 1000).time(1e-4, 1e-9) == pytest.approx(3e-4 + 1e-6)


@pytest.mark.parametrize("relative", [True, False])
def test_fit_recovers_known_alpha_and_beta(relative):
    alpha, beta = 50e-6, 8e-9  # 50 us, 1 Gbit/s
    costs = [cost_of(m, d, 0.001, p) for m in ("dense", "topk", "gtopk")
             for d in (1_000_000, 25_000_000) for p in (2, 4, 8)]
    times = [c.time(alpha, beta) for c in costs]
    a, b = fit_alpha_beta(costs, times, relative=relative)
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(beta, rel=1e-6)


def test_fit_never_returns_negative_parameters():
    # pure bandwidth data with noise that would make the free fit's alpha negative
    costs = [Cost(1, 1e6), Cost(2, 4e6), Cost(4, 1e7)]
    times = [0.9e-3, 4.1e-3, 9.9e-3]
    a, b = fit_alpha_beta(costs, times)
    assert a >= 0 and b > 0
    assert b == pytest.approx(1e-9, rel=0.1)


@pytest.mark.parametrize("costs, times, match", [
    ([Cost(1, 1)], [1.0], "at least 2"),
    ([Cost(1, 1), Cost(2, 2)], [1.0], "2 costs but 1 times"),
    ([Cost(1, 1), Cost(2, 2)], [1.0, 0.0], "must be > 0"),
    ([Cost(0, 0), Cost(0, 0)], [1.0, 2.0], "nothing to fit"),
])
def test_fit_rejects_bad_input_with_a_clear_message(costs, times, match):
    with pytest.raises(ValueError, match=match):
        fit_alpha_beta(costs, times)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        dense_allreduce_cost(10, 0)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        topk_allgather_cost(-1, 4)


# --- algorithm="auto": the Link, the choice per buffer, the measurement driver ---------------

def test_topk_never_sends_fewer_bytes_than_gtopk_so_auto_never_needs_it():
    for size in range(2, 130):
        assert gtopk_cost(100, size).bytes <= topk_allgather_cost(100, size).bytes, size


def test_link_refuses_negative_or_non_finite_values_naming_them():
    with pytest.raises(ValueError, match="link beta must be a finite number >= 0"):
        Link(1e-4, -1.0)
    with pytest.raises(ValueError, match="link alpha"):
        Link(float("nan"), 1e-9)
    with pytest.raises(ValueError, match="link overhead"):
        Link(1e-4, 1e-9, 0.0, True)
    with pytest.raises(ValueError, match=r"a tuple \(alpha_s, beta_s_per_byte"):
        as_link((1e-4,))
    assert as_link((1e-4, 1e-9)) == Link(1e-4, 1e-9, 0.0, 0.0)
    assert as_link(None) is None


def test_large_buffers_on_a_slow_link_go_by_gtopk_small_ones_with_a_fixed_cost_go_dense():
    slow = Link(alpha=0.0, beta=8e-9, select=1e-9, overhead=1e-4)  # about 1 Gbit/s
    assert choose_methods([100, 25_000_000], 0.001, 4, slow) == ("dense", "gtopk")
    fast = Link(alpha=0.0, beta=1e-11, select=1e-9, overhead=1e-4)  # a fast link: dense wins
    assert choose_methods([100, 25_000_000], 0.001, 4, fast) == ("dense", "dense")


def test_buffer_methods_is_the_algorithm_or_gtopk_until_the_link_is_known_then_the_choice():
    link = Link(alpha=0.0, beta=8e-9, select=1e-9, overhead=1e-4)
    assert buffer_methods("topk", [100, 10], 0.01, 4, link) == ("topk", "topk")
    assert buffer_methods("gtopk", [100, 10], 0.01, 4, None) == ("gtopk", "gtopk")
    assert buffer_methods("auto", [100, 25_000_000], 0.001, 4, None) == ("gtopk", "gtopk")
    assert buffer_methods("auto", [100, 25_000_000], 0.001, 4, link) == ("dense", "gtopk")
    assert buffer_methods("auto", [100], 0.001, 1, None) == ("dense",)  # one rank: exact
    assert describe_methods(("gtopk", "dense", "gtopk")) == \
        "1 buffer(s) by dense, 2 buffer(s) by gtopk"


def test_dense_rounds_count_once_and_only_when_some_buffer_goes_dense():
    link = Link(alpha=1e-3, beta=1e-9, select=0.0, overhead=2e-5)
    # alone, each small buffer would go dense (2e-5 x 3 > its bytes), but the 6 rounds of a
    # dense allreduce (6 ms) cost more than sparsifying all of them
    assert choose_methods([10, 10, 10], 0.1, 4, link) == ("gtopk",) * 3
    # once dense_threshold tensors pay the rounds anyway, they go dense
    assert choose_methods([10, 10, 10], 0.1, 4, link, dense_paid=True) == ("dense",) * 3
    # without latency the per-buffer choice stands
    assert choose_methods([10, 10, 10], 0.1, 4, Link(0.0, 1e-9, 0.0, 2e-5)) == ("dense",) * 3


def test_choice_follows_the_cost_of_each_method_and_ties_go_to_dense():
    link = Link(alpha=0.0, beta=1e-9)
    for d, density in ((1000, 0.001), (1000, 0.5), (1000, 1.0), (1 << 20, 0.01)):
        costs = method_costs(d, density, 8, link)
        (method,) = choose_methods([d], density, 8, link)
        assert costs[method] == min(costs.values()), (d, density, costs)
    zero = Link(0.0, 0.0)  # everything free: the exact method wins the tie
    assert choose_methods([1000], 0.01, 4, zero) == ("dense",)


def test_one_rank_sends_nothing_so_every_buffer_is_dense():
    assert choose_methods([10, 10 ** 7], 0.001, 1, Link(1.0, 1.0)) == ("dense", "dense")


def test_candidates_are_checked_and_restrict_the_choice():
    link = Link(alpha=0.0, beta=8e-9)
    assert choose_methods([10 ** 6], 0.001, 4, link, methods=("dense", "topk")) == ("topk",)
    with pytest.raises(ValueError, match="methods must hold 'dense'"):
        choose_methods([10], 0.1, 4, link, methods=("gtopk",))
    with pytest.raises(ValueError, match="methods must hold"):
        choose_methods([10], 0.1, 4, link, methods=("dense", "allgather"))


def test_measure_link_fits_alpha_beta_from_two_allreduce_sizes_and_agrees_before_fitting():
    alpha, beta, per_entry, fixed = 2e-4, 3e-9, 5e-9, 1e-4
    size, calls, now = 4, [], [0.0]

    def allreduce(n):  # a simulated ring allreduce: takes its model time on a fake clock
        calls.append(("allreduce", n))
        cost = dense_allreduce_cost(n, size)
        now[0] += cost.messages * alpha + cost.bytes * beta

    def select(n):
        calls.append(("select", n))
        now[0] += fixed + per_entry * n

    agreed = []

    def agree(values):  # another rank was twice as slow: its figures win
        agreed.append(list(values))
        return [v * 2 for v in values]

    def stage():  # a stage: one Horovod operation's negotiation and a round trip
        calls.append(("stage",))
        now[0] += 1e-3

    link = measure_link(allreduce, select, agree, size, n=1 << 18, repeats=3,
                        clock=lambda: now[0], stage=stage)
    assert len(agreed) == 1 and len(agreed[0]) == 7  # (no node probe: two zeros)
    assert link.intra_alpha is None and link.intra_beta is None
    assert [c for c in calls if c[0] == "allreduce"] == [("allreduce", 1)] * 4 + \
        [("allreduce", 1 << 18)] * 3
    assert calls.count(("stage",)) == 4  # a warm-up and three timed
    assert link.stage == pytest.approx(2e-3, rel=1e-6)
    assert link.alpha == pytest.approx(2 * alpha, rel=1e-6)
    assert link.beta == pytest.approx(2 * beta, rel=1e-6)
    assert link.overhead == pytest.approx(2 * (fixed + per_entry * 64), rel=1e-6)
    assert link.select == pytest.approx(2 * per_entry * (1 - 64 / (1 << 18)), rel=1e-6)


def test_gtopk_pays_a_stage_per_horovod_operation_so_small_buffers_go_dense():
    # 1 MB at density 0.001 on 64 ranks, 10 Gbit/s: by bytes alone gTop-k wins; its 6
    # stages of 1 ms (Horovod's negotiation each) make dense, 0.2 ms of rounds here, faster
    bytes_only = Link(alpha=1e-6, beta=8e-10)
    assert buffer_methods("auto", [250_000], 0.001, 64, bytes_only) == ("gtopk",)
    staged = Link(alpha=1e-6, beta=8e-10, stage=1e-3)
    rounds = round_costs(64, staged)
    assert rounds["gtopk"] == pytest.approx(6e-3) and rounds["dense"] == pytest.approx(126e-6)
    assert buffer_methods("auto", [250_000], 0.001, 64, staged) == ("dense",)
    # Top-k's one allgather (one operation, 63 x 2 KB) beats both here
    assert choose_methods([250_000], 0.001, 64, staged) == ("topk",)
    # 25M entries: 200 MB of ring traffic against 6 stages: gTop-k still
    assert buffer_methods("auto", [25_000_000], 0.001, 64, staged) == ("gtopk",)
    # a fold group's further messages cost alpha each (P = 6: stages of 3 ranks)
    assert round_costs(6, Link(1.0, 0.0, stage=10.0))["gtopk"] == \
        gtopk_stages(6) * 10.0 + (gtopk_cost(1, 6).messages - gtopk_stages(6)) * 1.0


def test_merges_cost_select_per_entry_merged():
    link = Link(alpha=0.0, beta=0.0, select=1e-9)
    d, density, size = 1 << 20, 0.01, 16
    k = k_for(d, density)
    costs = method_costs(d, density, size, link)
    assert costs["gtopk"] == pytest.approx(1e-9 * (d + 2 * k * gtopk_stages(size)))
    assert costs["topk"] == pytest.approx(1e-9 * (d + k * size))


def test_measure_link_times_the_node_link_where_a_node_set_is_given():
    now, alpha, beta, intra_alpha, intra_beta, local = [0.0], 2e-4, 8e-9, 1e-6, 1e-10, 4

    def allreduce(n):
        cost = dense_allreduce_cost(n, 8)
        now[0] += cost.messages * alpha + cost.bytes * beta

    def intra(n):  # the node's allreduce, on its own (faster) link
        cost = dense_allreduce_cost(n, local)
        now[0] += cost.messages * intra_alpha + cost.bytes * intra_beta

    link = measure_link(allreduce, lambda n: None, lambda v: v, 8, repeats=3,
                        clock=lambda: now[0], intra=intra, local=local)
    assert link.beta == pytest.approx(beta, rel=1e-6)
    assert link.intra_alpha == pytest.approx(intra_alpha, rel=1e-6)
    assert link.intra_beta == pytest.approx(intra_beta, rel=1e-6)


def test_hierarchical_is_chosen_where_the_network_card_is_the_bottleneck():
    """On N x L nodes flat gTop-k's cross-node stages put L ranks' sets through one card;
    hierarchical gTop-k sends k / L a rail but moves the buffer inside the node: it wins with
    a slow network and a fast node, loses with a node as slow as the network (node_costs)."""
    d, density, nodes = 25_000_000, 0.001, (8, 8)
    slow_net_fast_node = Link(alpha=5e-5, beta=8e-9, stage=1e-3, intra_alpha=1e-6,
                              intra_beta=1e-11)  # 1 Gbit/s between nodes, NVLink-class inside
    costs = node_costs(d, density, *nodes, slow_net_fast_node)
    assert costs["hierarchical"] < costs["gtopk"], costs
    assert buffer_methods("auto", [d, d // 2], density, 64, slow_net_fast_node,
                          dense_paid=True, nodes=nodes) == ("hierarchical", "hierarchical")
    node_as_slow = Link(alpha=5e-5, beta=8e-9, stage=1e-3)  # intra: the network's
    assert buffer_methods("auto", [d], density, 64, node_as_slow, nodes=nodes) == ("gtopk",)
    # without nodes (hierarchical=False, or a flat layout) 'hierarchical' is never offered
    assert buffer_methods("auto", [d], density, 64, slow_net_fast_node) == ("gtopk",)
    # the card's share: flat's cross-node stage bytes count L times, a rail's once
    one = Link(alpha=0.0, beta=1.0, intra_alpha=0.0, intra_beta=0.0)
    k = k_for(1 << 20, 0.01)
    assert node_costs(1 << 20, 0.01, 2, 4, one)["gtopk"] == 4 * 8 * k  # one crossing stage
    assert node_costs(1 << 20, 0.01, 2, 4, one)["hierarchical"] == \
        4 * 8 * k_for((1 << 20) // 4, 0.01)


def test_link_takes_the_node_terms_as_a_tuple_and_checks_them():
    assert as_link((1e-4, 1e-9, 0, 0, 1e-3, 1e-6, 1e-11)).intra_beta == 1e-11
    assert Link(1e-4, 1e-9).intra_alpha is None
    with pytest.raises(ValueError, match="intra_beta must be a finite number"):
        Link(1e-4, 1e-9, intra_beta=-1.0)


def test_measure_link_on_one_rank_has_no_network_terms():
    link = measure_link(lambda n: None, lambda n: None, lambda v: v, 1, repeats=1,
                        clock=iter(range(100)).__next__)
    assert (link.alpha, link.beta) == (0.0, 0.0)


def test_auto_without_a_link_is_refused_under_elastic_only():
    from gtopk_hvd.common.validation import check_auto_link
    with pytest.raises(ValueError, match="algorithm='auto' under Horovod Elastic needs link="):
        check_auto_link("auto", None, True, "gtopk_hvd.torch.measure_link")
    check_auto_link("auto", Link(0.0, 1e-9), True, "m")  # given: fine
    check_auto_link("auto", None, False, "m")  # measured after the first step: fine
    check_auto_link("gtopk", None, True, "m")
