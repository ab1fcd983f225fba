"""init() gives each rank its share of the host's cores when the ranks oversubscribe it
(gtopk_hvd.common.threads), in both frameworks, under real horovodrun jobs on this host."""
import json

import pytest

from gtopk_hvd.common.threads import THREADS_ENV, threads_for
from tests.harness import check_scenario, horovodrun

# one worker for both frameworks (tests/ itself must not be its sys.path[0]: tests/torch
# would shadow the torch package)
WORKER = "tests/torch/workers/threads_worker.py"
NO_THREAD_SETTING = {"OMP_NUM_THREADS": "", "TF_NUM_INTRAOP_THREADS": ""}


# in one job of 3 ranks per framework: rank 0 without a setting, rank 1 opted out, rank 2 (torch)
# with OMP_NUM_THREADS (each rank sets its own before importing the framework)
PER_RANK = {"torch": {"1": {THREADS_ENV: "keep"}, "2": {"OMP_NUM_THREADS": "2"}},
            "tf": {"1": {THREADS_ENV: "keep"}}}


@pytest.mark.parametrize("framework, np_", [("torch", 1), ("torch", 3), ("tf", 3)])
def test_init_shares_the_cores_among_the_ranks_of_a_host_unless_told_not_to(framework, np_):
    settings = PER_RANK[framework] if np_ > 1 else {}
    records = check_scenario(horovodrun(np_, WORKER, framework, json.dumps(settings),
                                        env=NO_THREAD_SETTING), "threads")
    for rank, r in enumerate(records):
        assert r["local_size"] == np_
        if str(rank) in settings:  # the opt-out and OMP_NUM_THREADS leave the threads alone
            assert r["after"] == r["before"], (settings[str(rank)], r)
            continue
        expected = threads_for(r["before"], r["cores"], np_, environ={})
        assert r["after"] == (r["before"] if expected is None else expected), r
        if np_ == 1:
            assert r["after"] == r["before"], r  # one rank: the user's threads stay
        else:
            assert r["after"] * np_ <= max(r["cores"], np_), r
