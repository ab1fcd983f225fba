"""The exchange schedule: one exchange per stage on every rank, consistent groups, full
coverage, mirrors for P not a power of two."""
import pytest

from gtopk_hvd.common import exchange_groups, stages_for, virtual_rank, world_split

SIZES = list(range(1, 34))


@pytest.mark.parametrize("size", SIZES)
def test_every_rank_runs_one_exchange_per_stage(size):
    m, _, _ = world_split(size)
    for r in range(size):
        assert [st.index for st in stages_for(r, size)] == list(range(m))


@pytest.mark.parametrize("size", SIZES)
def test_group_members_agree_on_their_stage(size):
    plans = [stages_for(r, size) for r in range(size)]
    for r, plan in enumerate(plans):
        for st in plan:
            assert r in st.group
            for member in st.group:  # every member sees the very same stage
                assert plans[member][st.index] == st, (size, r, st)


@pytest.mark.parametrize("size", SIZES)
def test_virtual_ranks_follow_the_hypercube_and_mirrors_join_them(size):
    m, base, extra = world_split(size)
    assert base <= size < 2 * base and extra == size - base
    for r in range(size):
        v = virtual_rank(r, size)
        assert v == (r - base if r >= base else r)
        for st in stages_for(r, size):
            assert {st.low, st.high} == {v, v ^ (1 << st.index)}
            assert set(st.group) == {x for x in range(size)
                                     if virtual_rank(x, size) in (st.low, st.high)}
            assert st.fold == (st.index == 0 and len(st.group) > 2)
            # after stage 0 only the two virtual ranks send entries; mirrors send headers
            assert set(st.senders) == (set(st.group) if st.index == 0 else {st.low, st.high})


@pytest.mark.parametrize("size", SIZES)
def test_every_rank_ends_with_every_contribution(size):
    """Simulate who has whose contribution: after the schedule every rank has all P."""
    have = [{r} for r in range(size)]
    for s in range(world_split(size)[0]):
        new = [set(h) for h in have]
        for r in range(size):
            st = stages_for(r, size)[s]
            for member in st.senders:
                new[r] |= have[member]
        have = new
    assert all(h == set(range(size)) for h in have)


@pytest.mark.parametrize("size", SIZES)
def test_exchange_groups_cover_every_stage_once_in_a_fixed_order(size):
    groups = exchange_groups(size)
    assert groups == exchange_groups(size)
    assert len(groups) == len(set(groups))
    assert all(list(g) == sorted(g) and 2 <= len(g) <= 4 for g in groups)
    used = {st.group for r in range(size) for st in stages_for(r, size)}
    assert used == set(groups)
    m, base, _ = world_split(size)
    assert len(groups) == m * base // 2


def test_bad_world_or_rank_is_refused():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            world_split(bad)
    with pytest.raises(ValueError, match="rank"):
        stages_for(4, 4)
