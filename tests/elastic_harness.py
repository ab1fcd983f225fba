"""Horovod Elastic jobs for the tests: Horovod's own elastic driver on this machine.

A job of 3 workers (host ``localhost``) grows to 4 (a worker on host ``127.0.0.1``; at P = 4
the exchange needs two-rank process sets, at P = 3 none), then that worker is killed with
SIGKILL and the job goes on with 3.  The worker script (one per framework) appends JSON events
to ``$GTOPK_ELASTIC_OUT/<pid>.jsonl``: ``start`` when its training function (re)starts after
a sync (world, batch, schedule step, residual norm), ``step`` after each step (world, batch,
a digest of the parameters, whether they are bitwise the same on every rank, residual norm),
``done`` at the end.  :func:`check_elastic_run` asserts on them, and on how long the survivors
took from the kill to their first step at 3: well under ``HOROVOD_GLOO_TIMEOUT_SECONDS``, so a
survivor that waits out Gloo's timeout on the dead peer (while the others re-initialise and may
time out waiting for it) fails the test every time, not only when the machine is slow.
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

from tests.harness import HOROVODRUN

ROOT = Path(__file__).resolve().parents[1]
GLOO_TIMEOUT_S = 60
RECOVERY_BOUND_S = 40  # kill -> first step of the 3 survivors; Gloo's timeout is 60 s


class Pace:
    """Called by the workers after each step: a pause of ``seconds`` while the world has
    never been larger, so that the harness sees it grow and kills the added worker mid-run;
    once the world has shrunk, the survivors run the remaining steps at full speed."""

    def __init__(self, seconds=0.3):
        self.seconds, self.largest = seconds, 0

    def __call__(self, size):
        self.largest = max(self.largest, size)
        if size == self.largest:
            time.sleep(self.seconds)


def events_in(out):
    events = []
    for path in Path(out).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["time"])


def _run_elastic_job(worker, total_steps, out, hosts_file, discovery, run, extra_env, base):
    env = dict(os.environ, GTOPK_ELASTIC_OUT=out, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HOROVOD_GLOO_TIMEOUT_SECONDS=str(GLOO_TIMEOUT_S), PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    cmd = [*HOROVODRUN, "--gloo", "-np", str(base), "--min-np", str(base), "--max-np",
           str(base + 1),
           "--host-discovery-script", discovery, "--elastic-timeout", "60",
           "--network-interface", "lo",
           str(sys.executable), str(worker), str(total_steps), run]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    grown = False
    killed = None  # when the worker was killed
    deadline = time.time() + int(os.environ.get("GTOPK_ELASTIC_DEADLINE", "400"))
    try:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            steps = [e for e in events_in(out) if e["kind"] == "step"]
            if not grown and any(e["batch"] >= 6 for e in steps):
                hosts_file.write_text(f"localhost:{base}\n127.0.0.1:1\n")
                grown = True
            third = [e for e in steps if e["size"] == base + 1 and e["host"] == "127.0.0.1"]
            if grown and not killed and len({e["batch"] for e in third}) >= 6:
                os.kill(third[-1]["pid"], signal.SIGKILL)
                killed = time.time()
                hosts_file.write_text(f"localhost:{base}\n")
        output = proc.communicate(timeout=max(1, deadline - time.time()))[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output, grown, killed


def run_elastic_job(worker, total_steps, run, extra_env=None, base=3):
    """Run ``worker`` elastically: ``base`` workers grown to ``base`` + 1 (the added one on
    127.0.0.1), then the added one killed.  Returns (horovodrun's exit code, its output,
    whether it grew, the time of the kill or None, the workers' events)."""
    with tempfile.TemporaryDirectory(prefix="gtopk_elastic_") as out:
        hosts_file = Path(out) / "hosts.txt"
        hosts_file.write_text(f"localhost:{base}\n")
        discovery = Path(out) / "discover.sh"
        discovery.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
        discovery.chmod(discovery.stat().st_mode | stat.S_IEXEC)
        out_dir = Path(out) / "events"
        out_dir.mkdir()
        rc, output, grown, killed = _run_elastic_job(worker, total_steps, str(out_dir),
                                                     hosts_file, str(discovery), run, extra_env,
                                                     base)
        return rc, output, grown, killed, events_in(out_dir)


def recovery_after_kill(events, killed, base):
    """Seconds from the kill to the survivors' first step at ``base`` workers (None if none)."""
    after = [e["time"] for e in events
             if killed and e["kind"] == "step" and e["time"] > killed and e["size"] == base]
    return min(after) - killed if after else None


def check_elastic_run(worker, total_steps, run, extra_env=None, base=3,
                      recovery_bound=RECOVERY_BOUND_S):
    """Run ``worker`` elastically (run_elastic_job) and assert on its events; returns the
    seconds from the kill to the survivors' first step."""
    rc, output, grown, killed, events = run_elastic_job(worker, total_steps, run, extra_env,
                                                        base)
    tail = output[-4000:]
    assert grown and killed, f"the job never reached the growth or the kill:\n{tail}"
    assert rc == 0, f"horovodrun exited with {rc}:\n{tail}"
    steps = [e for e in events if e["kind"] == "step"]
    recovery = recovery_after_kill(events, killed, base)
    assert recovery is not None, f"no step at {base} after the kill"
    assert recovery < recovery_bound, (
        f"the survivors took {recovery:.1f} s from the kill to their next step "
        f"(bound {recovery_bound} s, Gloo's timeout {GLOO_TIMEOUT_S} s):\n{tail}")
    assert all(e["same"] for e in steps), [e for e in steps if not e["same"]][:3]
    sizes = [e["size"] for e in steps]
    assert base + 1 in sizes and sizes[-1] == base, sizes
    assert max(e["batch"] for e in steps) == total_steps
    done = [e for e in events if e["kind"] == "done"]
    assert len(done) == base and all(e["batch"] == total_steps for e in done), done
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
    return recovery
