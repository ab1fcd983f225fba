"""The intra-op thread policy at init() (gtopk_hvd.common.threads.threads_for)."""
import pytest

from gtopk_hvd.common.threads import THREADS_ENV, threads_for


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
