"""gTop-k under Horovod Elastic, with Horovod's own elastic driver on this machine: a job of
3 workers (host ``localhost``) grows to 4 (a worker on host ``127.0.0.1``; at P = 4 the
exchange needs two-rank process sets, at P = 3 none), then that worker is killed with SIGKILL
and the job goes on with 3 (workers/elastic_worker.py); with
``gtopk_hvd.torch.elastic.run`` and with Horovod's own ``horovod.torch.elastic.run``, whose
reset re-initialises Horovod without gtopk_hvd.

Checked from the workers' logs: training reaches the last step; after every step the
parameters are bitwise the same on every rank of that world (an unnamed allgather inside the
loop); every (re)start shows every rank at the same schedule step; a worker that stays keeps
its residual across a reset (the norm at the restart equals the norm at its last commit) and
the new worker starts from zero.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "torch" / "workers" / "elastic_worker.py"
STEPS = 30


def _events(out):
    events = []
    for path in Path(out).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["time"])


def _run_elastic_job(out, hosts_file, discovery, run="gtopk"):
    env = dict(os.environ, GTOPK_ELASTIC_OUT=out, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HOROVOD_GLOO_TIMEOUT_SECONDS="60", PYTHONUNBUFFERED="1")
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "horovodrun"), "--gloo", "-np", "3", "--min-np", "3", "--max-np", "4",
           "--host-discovery-script", discovery, "--elastic-timeout", "60",
           "--network-interface", "lo",
           str(sys.executable), str(WORKER), str(STEPS), run]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    grown = killed = False
    deadline = time.time() + 400
    try:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            steps = [e for e in _events(out) if e["kind"] == "step"]
            if not grown and any(e["batch"] >= 6 for e in steps):
                hosts_file.write_text("localhost:3\n127.0.0.1:1\n")
                grown = True
            third = [e for e in steps if e["size"] == 4 and e["host"] == "127.0.0.1"]
            if grown and not killed and len({e["batch"] for e in third}) >= 6:
                os.kill(third[-1]["pid"], signal.SIGKILL)
                hosts_file.write_text("localhost:3\n")
                killed = True
        output = proc.communicate(timeout=max(1, deadline - time.time()))[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output, grown, killed


@pytest.mark.parametrize("run", ["gtopk", "horovod"])
def test_elastic_grow_then_kill_keeps_training_bit_identical(run):
    with tempfile.TemporaryDirectory(prefix="gtopk_elastic_") as out:
        hosts_file = Path(out) / "hosts.txt"
        hosts_file.write_text("localhost:3\n")
        discovery = Path(out) / "discover.sh"
        discovery.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
        discovery.chmod(discovery.stat().st_mode | stat.S_IEXEC)
        out_dir = Path(out) / "events"
        out_dir.mkdir()
        rc, output, grown, killed = _run_elastic_job(str(out_dir), hosts_file, str(discovery),
                                                     run)
        events = _events(out_dir)
    tail = output[-4000:]
    assert grown and killed, f"the job never reached the growth or the kill:\n{tail}"
    assert rc == 0, f"horovodrun exited with {rc}:\n{tail}"
    steps = [e for e in events if e["kind"] == "step"]
    assert all(e["same"] for e in steps), [e for e in steps if not e["same"]][:3]
    sizes = [e["size"] for e in steps]
    assert 4 in sizes and sizes[-1] == 3, sizes
    assert max(e["batch"] for e in steps) == STEPS
    done = [e for e in events if e["kind"] == "done"]
    assert len(done) == 3 and all(e["batch"] == STEPS for e in done), done
    # the same parameters on every rank for every (world, step) seen by several workers
    by_step = {}
    for e in steps:
        by_step.setdefault((e["size"], e["batch"]), set()).add(e["digest"])
    assert all(len(d) == 1 for d in by_step.values()), by_step
    starts = [e for e in events if e["kind"] == "start"]
    restarts = {}
    for e in starts:
        restarts.setdefault((e["size"], e["batch"]), []).append(e)
    for key, group in restarts.items():  # every rank restarts at the same schedule step
        assert len({e["gtopk_step"] for e in group}) == 1, (key, group)
        assert group[0]["gtopk_step"] == key[1], (key, group)
    for e in starts:
        before = [s for s in steps if s["pid"] == e["pid"] and s["time"] < e["time"]]
        if not before:
            assert e["residual_norm"] == 0.0 or e["batch"] == 0, e  # a new worker: zeros
            continue
        # a worker that stays keeps its own residual of its last commit (the step logged
        # with that batch count)
        last = [s for s in before if s["batch"] == e["batch"]]
        assert last and last[-1]["residual_norm"] == e["residual_norm"], (e, last[-1:])
