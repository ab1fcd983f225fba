"""The framework-free part of hvd.join(): rounds until every rank joined, the last rank."""
from gtopk_hvd.common.join import last_to_join, rounds_until_all_joined


def test_rounds_stop_at_the_first_step_that_finds_every_rank_joined():
    verdicts = iter([False, False, False, True, False])
    calls = []

    def step(tag):
        def run():
            calls.append(tag)
            return next(verdicts)
        return run
    assert rounds_until_all_joined([step("a"), step("b")]) == 2
    assert calls == ["a", "b", "a", "b"]  # the round's later steps are not taken


def test_the_last_rank_to_join_took_the_fewest_rounds():
    assert last_to_join([3, 2, 1, 1]) == (2, True)
    assert last_to_join([1, 1, 1]) == (0, False)  # every rank joined together: no catch-up
