"""Hierarchical gTop-k in the core: the layout (nodes, rails, the process sets a job needs,
the fallbacks) and the NumPy reference of one step, against the algorithm's invariants."""
import numpy as np
import pytest

from gtopk_hvd.common import k_for
from gtopk_hvd.common.hierarchy import hierarchical_layout, shard_bounds
from gtopk_hvd.common.reference import gtopk_step, hierarchical_step, select_topk

LAYOUTS = [(2, 2), (2, 3), (3, 2), (4, 2), (1, 3), (3, 1), (5, 2), (3, 3)]


def _data(nodes, local, d, seed, integer=True):
    rng = np.random.default_rng(seed)
    size = nodes * local
    draw = (lambda n: rng.integers(-6, 7, n).astype(np.float32)) if integer else \
        (lambda n: rng.standard_normal(n).astype(np.float32))
    grads = [draw(d) for _ in range(size)]
    shards = shard_bounds(d, local)
    residuals = [draw(shards[p % local][1] - shards[p % local][0]) for p in range(size)]
    return grads, residuals


def _assert_conserved(grads, residuals, res, local, d):
    """Every entry of the gradients and the residuals is applied (res.dense) or kept (the
    new residuals, each on its rank's shard); integer data: exact."""
    total = sum(g.astype(np.float64) for g in grads)
    for p, eps in enumerate(residuals):
        lo, hi = res.shards[p % local]
        total[lo:hi] += eps
    kept = np.zeros(d)
    for p, eps in enumerate(res.residuals):
        lo, hi = res.shards[p % local]
        kept[lo:hi] += eps
    np.testing.assert_array_equal(total, kept + res.dense(d))


def test_shard_bounds_cover_the_buffer_in_order():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 3) == [(0, 0), (0, 1), (1, 2)]
    with pytest.raises(ValueError, match="shards"):
        shard_bounds(10, 0)


@pytest.mark.parametrize("nodes,local", LAYOUTS)
def test_conservation_every_entry_is_applied_or_kept(nodes, local):
    d = 37
    grads, residuals = _data(nodes, local, d, seed=nodes * 10 + local)
    res = hierarchical_step(grads, residuals, local, density=0.1)
    _assert_conserved(grads, residuals, res, local, d)


@pytest.mark.parametrize("nodes,local", [(2, 2), (2, 3), (3, 2), (1, 3)])
def test_a_joined_rank_keeps_its_residual_and_what_its_shard_did_not_apply(nodes, local):
    """join(): a joined rank contributes zeros and its residual stays out of its shard's sum;
    what of the other local ranks' gradients on its shard did not reach the result is added
    to its residual: every entry is still applied or kept."""
    d, joined = 37, {local - 1}  # the last rank of node 0
    grads, residuals = _data(nodes, local, d, seed=nodes * 100 + local)
    grads[local - 1] = np.zeros(d, np.float32)
    res = hierarchical_step(grads, residuals, local, density=0.1, joined=joined)
    _assert_conserved(grads, residuals, res, local, d)
    lo, hi = res.shards[local - 1]
    node_sum = sum(g[lo:hi] for g in grads[:local])
    assert np.array_equal(res.accs[local - 1], node_sum)  # its residual stayed out
    left = res.residuals[local - 1] - residuals[local - 1]
    assert np.all((left == 0) | (left == node_sum))  # kept: the unapplied part of the sum


@pytest.mark.parametrize("nodes,local", LAYOUTS)
def test_each_rail_is_flat_gtopk_on_the_compensated_node_sums(nodes, local):
    d = 41
    grads, residuals = _data(nodes, local, d, seed=7 + nodes + local, integer=False)
    res = hierarchical_step(grads, residuals, local, density=0.2)
    for l, (lo, hi) in enumerate(res.shards):
        rail = [n * local + l for n in range(nodes)]
        accs = []
        for p in rail:
            node = list(range(p - l, p - l + local))
            acc = grads[node[0]][lo:hi].copy()
            for q in node[1:]:
                acc = acc + grads[q][lo:hi]
            accs.append(acc + residuals[p])
        want = gtopk_step(accs, k_for(hi - lo, 0.2))
        assert res.ks[l] == k_for(hi - lo, 0.2)
        mine = (res.indices >= lo) & (res.indices < hi)
        np.testing.assert_array_equal(res.indices[mine], want.indices + lo)
        np.testing.assert_array_equal(res.values[mine], want.values)
        for p, eps in zip(rail, want.residuals):
            np.testing.assert_array_equal(res.residuals[p], eps)


def test_one_rank_a_node_is_flat_gtopk():
    grads, residuals = _data(5, 1, 30, seed=3, integer=False)
    res = hierarchical_step(grads, residuals, 1, density=0.1)
    want = gtopk_step([g + e for g, e in zip(grads, residuals)], k_for(30, 0.1))
    np.testing.assert_array_equal(res.indices, want.indices)
    np.testing.assert_array_equal(res.values, want.values)


def test_one_node_keeps_a_local_top_k_of_each_shard():
    grads, residuals = _data(1, 3, 30, seed=4, integer=False)
    res = hierarchical_step(grads, residuals, 3, density=0.1)
    for l, (lo, hi) in enumerate(res.shards):
        acc = grads[0][lo:hi] + grads[1][lo:hi] + grads[2][lo:hi] + residuals[l]
        mine = res.indices[(res.indices >= lo) & (res.indices < hi)]
        np.testing.assert_array_equal(mine, select_topk(acc, k_for(hi - lo, 0.1)) + lo)


@pytest.mark.parametrize("nodes,local", [(2, 2), (3, 2), (2, 3)])
def test_density_one_is_the_dense_sum(nodes, local):
    grads, residuals = _data(nodes, local, 23, seed=5)
    zeros = [np.zeros_like(e) for e in residuals]
    res = hierarchical_step(grads, zeros, local, density=1.0)
    np.testing.assert_array_equal(res.dense(23), sum(grads))
    assert all(not eps.any() for eps in res.residuals)


def test_bad_input_names_the_value():
    grads, residuals = _data(2, 2, 10, seed=6)
    with pytest.raises(ValueError, match="local_size must divide the 4 ranks"):
        hierarchical_step(grads, residuals, 3, density=0.1)
    with pytest.raises(ValueError, match=r"residuals\[1\] must cover shard 1 of 5"):
        hierarchical_step(grads, residuals[:1] + [np.zeros(4)] + residuals[2:], 2, 0.1)


@pytest.mark.parametrize("size,local,cross,homogeneous,mode", [
    (4, 2, 2, True, "hierarchical"), (6, 3, 2, True, "hierarchical"),
    (3, 2, 2, False, "flat"), (3, 1, 3, True, "flat"), (3, 3, 1, True, "node"),
    (1, 1, 1, True, "flat")])
def test_layout_mode_and_its_reason(size, local, cross, homogeneous, mode):
    layout = hierarchical_layout(size, local, cross, homogeneous)
    assert layout.mode == mode
    assert (layout.reason == "") == (mode == "hierarchical")


@pytest.mark.parametrize("nodes,local,expected", [
    # node sets + each rail's stage groups (N = 2: one pair; N = 4: four pairs; N = 3: one
    # group of three, the fold)
    (2, 2, 2 + 2), (2, 4, 2 + 4), (4, 2, 4 + 2 * 4), (8, 8, 8 + 8 * 12), (3, 2, 3 + 2 * 1)])
def test_process_sets_a_job_needs(nodes, local, expected):
    layout = hierarchical_layout(nodes * local, local, nodes, True)
    groups = layout.process_sets()
    assert len(groups) == len(set(groups)) == expected
    for l in range(local):  # rail groups hold ranks of one local rank, one per node
        for group in layout.rail_groups(l):
            assert {p % local for p in group} == {l}
            assert len({p // local for p in group}) == len(group)


# --- the exchange of one rank, every rank in a thread (in-memory alltoall and allgather) -----

def _run_hierarchical(nodes, local, grads, residuals, density, flags_of=lambda p: 0,
                      digest_of=lambda p: 5):
    """Every rank's exchange in a thread of tests/common/test_collective.py's in-memory
    world; an alltoall is an allgather of the whole buffers there, each rank keeping the
    slice it is sent."""
    from gtopk_hvd.common.hierarchy import drive_requests, hierarchical_exchange_steps
    from tests.common.test_collective import _run_ranks

    layout = hierarchical_layout(nodes * local, local, nodes, True)

    def body(rank, ops):
        lo, hi = shard_bounds(len(grads[rank]), local)[rank % local]
        steps = hierarchical_exchange_steps(
            ops, grads[rank], residuals[rank], k_for(hi - lo, density), layout, rank,
            digest=digest_of(rank), flags=flags_of(rank))

        def alltoall(parts, group, name):
            whole = ops.allgather(np.concatenate(parts), group, name)
            d = len(whole) // len(group)
            return [whole[i * d + lo:i * d + hi] for i in range(len(group))]
        return drive_requests(steps, alltoall, ops.allgather)

    return _run_ranks(nodes * local, body)


@pytest.mark.parametrize("nodes,local", LAYOUTS)
def test_every_rank_of_the_exchange_equals_the_reference(nodes, local):
    d = 53
    grads, residuals = _data(nodes, local, d, seed=100 + nodes * 7 + local, integer=False)
    want = hierarchical_step(grads, residuals, local, density=0.1)
    for rank, got in enumerate(_run_hierarchical(nodes, local, grads, residuals, 0.1)):
        np.testing.assert_array_equal(got.indices, want.indices, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(got.values, want.values, err_msg=f"rank {rank}")
        eps = got.acc.copy()
        eps[got.local_indices[got.alive]] = 0
        np.testing.assert_array_equal(eps, want.residuals[rank], err_msg=f"rank {rank}")
        assert got.verdict == 0


@pytest.mark.parametrize("nodes,local", [(2, 2), (3, 2), (2, 3)])
def test_a_nan_on_one_rank_and_a_digest_on_another_reach_every_rank(nodes, local):
    from gtopk_hvd.common.collective import MISMATCH, NONFINITE
    d = 20
    grads, residuals = _data(nodes, local, d, seed=9)
    grads[0][3] = np.nan  # rank 0's node: the NaN is in its shard sums, one rail
    got = _run_hierarchical(nodes, local, grads, residuals, 0.2)
    assert [r.verdict & NONFINITE for r in got] == [NONFINITE] * (nodes * local)
    grads[0][3] = 1.0
    last = nodes * local - 1
    got = _run_hierarchical(nodes, local, grads, residuals, 0.2,
                            digest_of=lambda p: 6 if p == last else 5)
    assert [r.verdict & MISMATCH for r in got] == [MISMATCH] * (nodes * local)


@pytest.mark.parametrize("nodes,local", [(2, 2), (2, 4), (4, 2), (8, 8)])
def test_the_network_carries_a_factor_l_fewer_bytes_than_flat_gtopk(nodes, local):
    """Bytes each node puts on the network in one step of a 25M-entry buffer at density
    0.001: flat gTop-k on node-contiguous ranks (the stages whose pairs span two nodes) against
    the hierarchical rails (k / L entries a rank)."""
    from gtopk_hvd.common.collective import message_bytes
    from gtopk_hvd.common.schedule import stages_for
    d, density, size = 25_000_000, 0.001, nodes * local
    k = k_for(d, density)
    flat = sum(message_bytes(k) for rank in range(local)  # node 0's ranks
               for st in stages_for(rank, size)
               if len({m // local for m in st.group}) > 1)
    layout = hierarchical_layout(size, local, nodes, True)
    hier = 0
    for rank in range(local):
        lo, hi = layout.shard(d, rank)
        hier += sum(message_bytes(k_for(hi - lo, density))
                    for st in stages_for(0, nodes))  # node 0 on every rail
    assert flat / hier == pytest.approx(local, rel=0.01), (flat, hier)


def test_a_call_is_checked_before_any_communication():
    from gtopk_hvd.common.hierarchy import prepare_call
    layout = hierarchical_layout(4, 2, 2, True)
    (lo, hi), k, plan = prepare_call(layout, 11, 3, 0.2, "Average", "gtopk", None)
    assert (lo, hi, k) == (5, 11, k_for(6, 0.2)) and plan["local_size"] == 2
    with pytest.raises(ValueError, match="algorithm must be 'gtopk'"):
        prepare_call(layout, 11, 3, 0.2, "Average", "topk", None)
    with pytest.raises(ValueError, match="a float32 tensor of 6 elements"):
        prepare_call(layout, 11, 3, 0.2, "Average", "gtopk", 11)
