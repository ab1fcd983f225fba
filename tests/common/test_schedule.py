"""The exchange schedule: consistent pairs, full coverage, fold/unfold for P not a power of two."""
import pytest

from gtopk_hvd.common import FOLD, HYPERCUBE, UNFOLD, pair_groups, stages_for, world_split

SIZES = list(range(1, 34))


@pytest.mark.parametrize("size", SIZES)
def test_partners_are_symmetric_stage_by_stage(size):
    plans = [stages_for(r, size) for r in range(size)]
    for r, plan in enumerate(plans):
        for st in plan:
            assert st.partner != r
            back = [t for t in plans[st.partner] if t.kind == st.kind and t.partner == r]
            assert len(back) == 1, (size, r, st)
            other = back[0]
            assert other.index == st.index
            # one side sends what the other receives
            assert st.sends == other.receives and st.receives == other.sends


@pytest.mark.parametrize("size", SIZES)
def test_hypercube_stage_order_and_xor_partners(size):
    m, base, extra = world_split(size)
    assert base <= size < 2 * base and extra == size - base
    for r in range(base):
        cube = [st for st in stages_for(r, size) if st.kind == HYPERCUBE]
        assert [st.index for st in cube] == list(range(m))
        assert [st.partner for st in cube] == [r ^ (1 << s) for s in range(m)]


@pytest.mark.parametrize("size", SIZES)
def test_every_rank_ends_in_the_same_block(size):
    """Simulate who has whose contribution: after the schedule every rank has all P."""
    m, base, extra = world_split(size)
    have = [{r} for r in range(size)]
    plans = [stages_for(r, size) for r in range(size)]
    for phase in (FOLD,) + tuple((HYPERCUBE, s) for s in range(m)) + (UNFOLD,):
        new = [set(h) for h in have]
        for r in range(size):
            for st in plans[r]:
                match = st.kind == phase if isinstance(phase, str) else \
                    (st.kind, st.index) == phase
                if match and st.receives:
                    new[r] |= have[st.partner]
        have = new
    assert all(h == set(range(size)) for h in have)


@pytest.mark.parametrize("size", SIZES)
def test_fold_and_unfold_cover_exactly_the_extra_ranks(size):
    m, base, extra = world_split(size)
    folded = {st.partner for r in range(size) for st in stages_for(r, size)
              if st.kind == FOLD and st.receives}
    unfolded = {r for r in range(size) for st in stages_for(r, size)
                if st.kind == UNFOLD and st.receives}
    assert folded == unfolded == set(range(base, size))
    for e in range(base, size):
        assert [(st.kind, st.partner) for st in stages_for(e, size)] == \
            [(FOLD, e - base), (UNFOLD, e - base)]


@pytest.mark.parametrize("size", SIZES)
def test_pair_groups_cover_every_stage_once_in_a_fixed_order(size):
    groups = pair_groups(size)
    assert groups == pair_groups(size)
    assert len(groups) == len(set(groups))
    assert all(a < b for a, b in groups)
    used = {tuple(sorted((r, st.partner))) for r in range(size) for st in stages_for(r, size)}
    assert used == set(groups)
    m, base, extra = world_split(size)
    assert len(groups) == extra + m * base // 2


def test_bad_world_or_rank_is_refused():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            world_split(bad)
    with pytest.raises(ValueError, match="rank"):
        stages_for(4, 4)
