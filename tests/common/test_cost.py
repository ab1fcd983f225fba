"""The alpha-beta cost model (gtopk_hvd.common.cost) against ALGORITHM.md's table, and its fit."""
import math

import pytest

from gtopk_hvd.common.cost import (Cost, cost_of, dense_allreduce_cost, fit_alpha_beta,
                                   gtopk_cost, gtopk_stages, topk_allgather_cost)


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
