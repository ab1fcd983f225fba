"""Smoke test of the emulated cluster (benchmarks/cluster.py): two hosts as network namespaces.

Checks that a Horovod allreduce across the two namespaces is right on both ranks, that the
shaped interfaces counted its bytes, that a failing rank is reported, and that no namespace
is left behind, whether the test passes or fails.  Skipped, with the reason, where namespaces
cannot be made (not root, no iproute2, no netns support).  The loopback fallback is tested
everywhere.
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import cluster as cl  # noqa: E402

WORKER = Path(__file__).with_name("cluster_worker.py")
NETNS_OK, NETNS_WHY = cl.netns_support()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"no emulated cluster here: {NETNS_WHY}")
ENV = {"OMP_NUM_THREADS": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "60",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def no_leftover_namespaces():
    """Whatever happens in the test, leave no namespace of this process behind."""
    yield
    leftover = cl.namespaces(owner=os.getpid())
    cl.cleanup(force=True, owner=os.getpid())
    assert not leftover, f"namespaces left behind: {leftover}"


def _run_smoke(cluster, tmp_path, env=None):
    codes = cluster.run([sys.executable, str(WORKER)],
                        env={**ENV, "GTOPK_SMOKE_OUT": str(tmp_path), **(env or {})},
                        timeout=90, log_dir=tmp_path / "logs")
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert codes == [0] * cluster.size, f"exit codes {codes}\n{logs}"
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(cluster.size)]
    for r, rec in enumerate(records):
        assert rec["ok"], f"rank {r} failed:\n{rec.get('error')}\n{logs}"
        assert rec["size"] == cluster.size and rec["label"] == cluster.label
    return records


@needs_netns
@pytest.mark.timeout(120)
def test_allreduce_across_two_namespaces_is_right_and_counted_on_the_wire(tmp_path):
    with cl.Cluster(2, rate="1gbit", delay=0, mode="netns") as cluster:
        assert cluster.label == "netns:1gbit"
        assert len(cl.namespaces(owner=os.getpid())) == 3  # switch + 2 hosts
        before = cluster.counters()
        records = _run_smoke(cluster, tmp_path)
        after = cluster.counters()
    # a ring allreduce of 40 kB on 2 ranks sends 40 kB per rank, plus Horovod's coordination
    for rec in records:
        assert rec["tx"] >= 40_000 and rec["rx"] >= 40_000, rec
    for b, a in zip(before, after):
        assert a["tx_bytes"] - b["tx_bytes"] >= 40_000
    assert not cl.namespaces(owner=os.getpid())


@needs_netns
@pytest.mark.timeout(120)
def test_two_hosts_of_two_ranks_keep_their_own_traffic_off_the_link(tmp_path):
    """ranks_per_host=2: the ranks are told their local and cross ranks as on two machines,
    and a 4 MB allreduce among a host's own ranks does not cross its interface."""
    with cl.Cluster(2, rate="1gbit", delay=0, mode="netns", ranks_per_host=2) as cluster:
        assert len(cl.namespaces(owner=os.getpid())) == 3  # switch + 2 hosts
        records = _run_smoke(cluster, tmp_path, env={"GTOPK_SMOKE_NODES": "1"})
    for r, rec in enumerate(records):
        assert (rec["local_rank"], rec["local_size"]) == (r % 2, 2), rec
        assert (rec["cross_rank"], rec["cross_size"]) == (r // 2, 2), rec
        assert rec["node_tx"] < 400_000, rec  # 4 MB through eth0 would send 4 MB or more
        assert rec["tx"] >= 40_000, rec  # the global allreduce crossed the link


@needs_netns
@pytest.mark.timeout(60)
def test_failing_rank_stops_the_others_and_namespaces_go_away_on_an_exception():
    script = ("import os, sys, time\n"
              "if os.environ['HOROVOD_RANK'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    with pytest.raises(RuntimeError, match="boom"):
        with cl.Cluster(2, rate="unshaped", mode="netns") as cluster:
            codes = cluster.run([sys.executable, "-c", script], timeout=30, quiet=True)
            assert codes[1] == 3 and codes[0] < 0, codes  # rank 0 was terminated, not waited on
            raise RuntimeError("boom")
    assert not cl.namespaces(owner=os.getpid())


@needs_netns
@pytest.mark.timeout(60)
def test_shaping_holds_the_configured_rate():
    with cl.Cluster(2, rate="100mbit", delay=0, mode="netns") as cluster:
        rate = cluster.measure_throughput(0, 1, 2_500_000)  # 0.2 s at 100 Mbit/s
    assert 60e6 < rate < 110e6, f"measured {rate / 1e6:.1f} Mbit/s on a 100 Mbit/s link"


@pytest.mark.timeout(120)
def test_loopback_fallback_runs_the_same_job_and_says_so(tmp_path):
    with cl.Cluster(2, mode="loopback") as cluster:
        assert cluster.label == "loopback" and cluster.fallback_reason
        _run_smoke(cluster, tmp_path)


def test_ranks_get_the_environment_horovodrun_gives_them():
    cluster = cl.Cluster(3, mode="loopback")
    cluster.mode = "netns"  # no namespaces are made: only the environment is computed
    env = cluster.rank_env(2, 4242, ["a", "b", "c"])
    assert env["HOROVOD_RANK"] == "2" and env["HOROVOD_SIZE"] == "3"
    assert env["HOROVOD_HOSTNAME"] == "c" and env["HOROVOD_GLOO_IFACE"] == "eth0"
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("0", "1")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("2", "3")
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == cl.SWITCH_IP
    assert env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "4242"


def test_hosts_of_several_ranks_number_them_host_by_host():
    cluster = cl.Cluster(2, mode="loopback", ranks_per_host=3)
    cluster.mode = "netns"
    assert cluster.size == 6
    env = cluster.rank_env(4, 4242, ["a", "b"])
    assert (env["HOROVOD_RANK"], env["HOROVOD_SIZE"], env["HOROVOD_HOSTNAME"]) == ("4", "6", "b")
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "3")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("1", "2")
    with pytest.raises(ValueError, match="ranks_per_host"):
        cl.Cluster(2, ranks_per_host=0)


@pytest.mark.parametrize("text, bits", [("1gbit", 1e9), ("10gbit", 1e10), ("100mbit", 1e8),
                                        ("unshaped", None), (None, None)])
def test_rates_parse(text, bits):
    assert cl.parse_rate(text) == bits


def test_bad_rate_and_delay_are_refused_with_the_expected_form():
    with pytest.raises(ValueError, match="'1gbit'"):
        cl.parse_rate("fast")
    with pytest.raises(ValueError, match="'0.1ms'"):
        cl.parse_time("soon")
    assert cl.parse_time("0.1ms") == pytest.approx(1e-4)
