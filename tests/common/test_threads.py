"""The intra-op thread policy at init() (gtopk_hvd.common.threads.threads_for)."""
import pytest

from gtopk_hvd.common.threads import (THREADS_ENV, WAIT_ENV, sleeps, threads_for,
                                      waits_politely)


def test_one_rank_per_host_keeps_the_threads_so_a_single_rank_job_is_unchanged():
    assert threads_for(current=16, cores=16, local_size=1, environ={}) is None
    assert threads_for(current=64, cores=2, local_size=1, environ={}) is None


def test_ranks_that_oversubscribe_the_host_get_their_share_of_the_cores():
    assert threads_for(current=2, cores=2, local_size=4, environ={}) == 1
    assert threads_for(current=32, cores=64, local_size=4, environ={}) == 16
    assert threads_for(current=64, cores=64, local_size=3, environ={}) == 21


def test_ranks_that_fit_on_the_host_keep_their_threads():
    assert threads_for(current=8, cores=64, local_size=4, environ={}) is None
    assert threads_for(current=1, cores=2, local_size=4, environ={}) is None  # already 1


def test_the_users_choice_wins():
    assert threads_for(2, 2, 4, environ={"OMP_NUM_THREADS": "2"}) is None
    assert threads_for(2, 2, 4, environ={THREADS_ENV: "keep"}) is None
    assert threads_for(2, 64, 1, environ={THREADS_ENV: "3"}) == 3
    assert threads_for(3, 64, 1, environ={THREADS_ENV: "3"}) is None


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_setting_names_the_variable_and_the_fix(bad):
    with pytest.raises(ValueError, match=f"{THREADS_ENV} must be 'keep' or a positive integer"):
        threads_for(2, 2, 4, environ={THREADS_ENV: bad})


def test_waits_sleep_only_where_the_host_has_more_ranks_than_cores():
    assert waits_politely(cores=2, local_size=4, environ={})
    assert not waits_politely(cores=2, local_size=2, environ={})
    assert not waits_politely(cores=64, local_size=8, environ={})
    assert waits_politely(cores=64, local_size=1, environ={WAIT_ENV: "sleep"})
    assert not waits_politely(cores=2, local_size=4, environ={WAIT_ENV: "spin"})
    with pytest.raises(ValueError, match=f"{WAIT_ENV} must be 'sleep' or 'spin'"):
        waits_politely(2, 4, environ={WAIT_ENV: "busy"})


def test_sleeps_start_short_and_stay_under_half_a_millisecond():
    gen = sleeps()
    first = [next(gen) for _ in range(12)]
    assert first[0] == 2e-5 and first[1] == 4e-5
    assert max(first) == 5e-4 and first[-1] == 5e-4
    assert all(a <= b for a, b in zip(first, first[1:]))
