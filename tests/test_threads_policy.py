"""init() gives each rank its share of the host's cores when the ranks oversubscribe it
(gtopk_hvd.common.threads), in both frameworks, under real horovodrun jobs on this host."""
import pytest

from gtopk_hvd.common.threads import THREADS_ENV, threads_for
from tests.harness import check_scenario, horovodrun

# one worker for both frameworks (tests/ itself must not be its sys.path[0]: tests/torch
# would shadow the torch package)
WORKER = "tests/torch/workers/threads_worker.py"
NO_THREAD_SETTING = {"OMP_NUM_THREADS": "", "TF_NUM_INTRAOP_THREADS": ""}


@pytest.mark.parametrize("framework, np_", [("torch", 1), ("torch", 3), ("tf", 3)])
def test_init_shares_the_cores_among_the_ranks_of_a_host(framework, np_):
    records = check_scenario(horovodrun(np_, WORKER, framework, env=NO_THREAD_SETTING),
                             "threads")
    for r in records:
        assert r["local_size"] == np_
        expected = threads_for(r["before"], r["cores"], np_, environ={})
        assert r["after"] == (r["before"] if expected is None else expected), r
        if np_ == 1:
            assert r["after"] == r["before"], r  # one rank: the user's threads stay
        else:
            assert r["after"] * np_ <= max(r["cores"], np_), r


@pytest.mark.parametrize("framework, env", [
    ("torch", {**NO_THREAD_SETTING, THREADS_ENV: "keep"}), ("torch", {"OMP_NUM_THREADS": "2"}),
    ("tf", {**NO_THREAD_SETTING, THREADS_ENV: "keep"})], ids=["torch-keep", "torch-omp", "tf-keep"])
def test_the_opt_out_and_omp_num_threads_leave_the_threads_alone(framework, env):
    for r in check_scenario(horovodrun(3, WORKER, framework, env=env), "threads"):
        assert r["after"] == r["before"], (env, r)
