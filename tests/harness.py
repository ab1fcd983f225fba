"""Launch real multi-process Horovod jobs from pytest and collect what each rank reports.

A worker script runs under ``horovodrun -np N`` (Gloo, localhost).  It runs named scenarios,
each asserting on its own rank against the NumPy reference, and records per scenario either
``{"ok": True, ...data}`` or ``{"ok": False, "error": traceback}`` with :class:`Recorder`.
The pytest side gets one dict per rank and checks that every rank passed every scenario.
Running many scenarios in one job keeps the suite fast on 2 cores (one interpreter start
per world size, not per check).
"""
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_ENV = "GTOPK_TEST_OUT"
TIMES_ENV = "GTOPK_TEST_TIMES"  # a file: rank 0 of every job appends each scenario's seconds


# horovodrun without its build probe (tests/hvdrun.py): the same launcher, 5 s less per launch
HOROVODRUN = [sys.executable, str(ROOT / "tests" / "hvdrun.py")]

# Gloo's TCP set-up can fail when another job on the machine grabs a port at the same moment;
# such a launch is retried once.  Any other failure (an assertion, a hang) is reported at once.
_TRANSIENT = ("gloo::IoException", "Connection refused", "Connection reset by peer")


def emulated_hosts(nodes, ranks):
    """horovodrun's ``-H`` for ``nodes`` emulated nodes of ``ranks`` ranks on this machine, or
    None where this machine has fewer distinct names that resolve to it.  Horovod groups ranks
    by the names in ``-H`` and runs here every name whose address is one of this machine's:
    ``localhost``, ``127.0.0.1``, the host name and each interface's IPv4 address."""
    import socket

    import psutil

    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET}
    names = ["localhost", "127.0.0.1", socket.gethostname(), *sorted(mine - {"127.0.0.1"})]
    local = []
    for name in names:
        try:
            if socket.gethostbyname(name) in mine and name not in local:
                local.append(name)
        except OSError:
            continue
    if len(local) < nodes:
        return None
    return ",".join(f"{name}:{ranks}" for name in local[:nodes])


def horovodrun(np_, script, *args, timeout=600, env=None, attempts=2, survivors=False,
               hosts=None):
    """Run ``horovodrun -np np_ python script args``; return the per-rank result dicts.

    ``hosts``: horovodrun's ``-H`` (default ``localhost:np_``); every name that resolves to
    this machine runs here, so ``localhost:2,127.0.0.1:2`` is two nodes of two ranks.

    ``survivors``: each rank runs inside ``sh -c '...; exit 0'`` so that horovodrun does not
    terminate the other ranks when one dies; ranks that wrote no result give None.
    """
    for attempt in range(attempts):
        try:
            return _horovodrun_once(np_, script, *args, timeout=timeout, env=env,
                                    survivors=survivors, hosts=hosts)
        except RuntimeError as err:
            if attempt + 1 == attempts or not any(t in str(err) for t in _TRANSIENT):
                raise


def _horovodrun_once(np_, script, *args, timeout=600, env=None, survivors=False, hosts=None):
    with tempfile.TemporaryDirectory(prefix="gtopk_mp_") as out:
        full_env = dict(os.environ)
        full_env.update({
            OUT_ENV: out,
            "PYTHONPATH": os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")]),
            "TF_USE_LEGACY_KERAS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "OMP_NUM_THREADS": "1",
            "HOROVOD_GLOO_TIMEOUT_SECONDS": "120",
            "PYTHONUNBUFFERED": "1",
        })
        if hosts and np_ > (os.cpu_count() or 1):
            # emulated hosts: each counts only its own ranks against the cores, so the
            # library would spin while the machine's cores are oversubscribed
            full_env["GTOPK_HVD_WAIT"] = "sleep"
        full_env.update(env or {})
        cmd = [*HOROVODRUN, "-np", str(np_), "-H", hosts or f"localhost:{np_}", "--gloo",
               sys.executable, str(ROOT / script), *map(str, args)]
        if survivors:
            cmd[7:] = ["sh", "-c", " ".join(cmd[7:]) + "; exit 0"]
        proc = subprocess.run(cmd, env=full_env, cwd=str(ROOT), capture_output=True, text=True,
                              timeout=timeout)
        results = []
        for r in range(np_):
            path = Path(out) / f"rank{r}.pkl"
            results.append(pickle.loads(path.read_bytes()) if path.exists() else None)
        if proc.returncode != 0 or (not survivors and any(r is None for r in results)):
            raise RuntimeError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}\n"
                f"--- stdout (tail) ---\n{proc.stdout[-6000:]}\n"
                f"--- stderr (tail) ---\n{proc.stderr[-6000:]}")
        return results


def run_python(script, *args, timeout=300, env=None):
    """Run ``script`` (Python source) in a plain ``python -c`` process as a user's program
    runs (one rank, no horovodrun; TensorFlow as the tests set it up; ``env`` added to the
    environment); its stdout lines."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def rank_array(seed, rank, d, integer=False, low=-3, high=4):
    """Rank ``rank``'s float32 input of scenario ``seed``: standard normal or small integers.
    Every rank of a job generates every rank's inputs this way, so each can run the NumPy
    reference of the whole step on its own (the workers of both frameworks use it)."""
    rng = np.random.default_rng([seed, rank])
    if integer:
        return rng.integers(low, high, d).astype(np.float32)
    return rng.standard_normal(d).astype(np.float32)


def check_scenario(results, name):
    """Assert that scenario ``name`` passed on every rank; return the per-rank records."""
    records = []
    for rank, res in enumerate(results):
        assert name in res, f"rank {rank} did not run scenario {name!r} (ran {sorted(res)})"
        rec = res[name]
        assert rec["ok"], f"scenario {name!r} failed on rank {rank}:\n{rec['error']}"
        records.append(rec)
    return records


class Recorder:
    """Used inside a worker: ``with rec("name") as data: ...`` records success or the traceback.

    ``data`` is a dict the scenario may fill with values the pytest side checks too.
    """

    def __init__(self, rank):
        self.rank = rank
        self.results = {}

    def __call__(self, name):
        return _Scenario(self, name)

    def save(self):
        out = os.environ.get(OUT_ENV)
        if out:
            Path(out, f"rank{self.rank}.pkl").write_bytes(pickle.dumps(self.results))


class _Scenario:
    def __init__(self, recorder, name):
        self.recorder, self.name, self.data = recorder, name, {}

    def __enter__(self):
        self.start = time.perf_counter()
        return self.data

    def __exit__(self, exc_type, exc, tb):
        times = os.environ.get(TIMES_ENV)
        if times and self.recorder.rank == 0:  # where a job's time goes, scenario by scenario
            with open(times, "a") as f:
                f.write(f"{time.perf_counter() - self.start:8.2f} s  {Path(sys.argv[0]).name} "
                        f"{os.environ.get('HOROVOD_SIZE', '?')} {self.name}\n")
        if exc_type is None:
            self.recorder.results[self.name] = {"ok": True, **self.data}
        else:
            self.recorder.results[self.name] = {
                "ok": False, "error": "".join(traceback.format_exception(exc_type, exc, tb))}
        return exc_type is not None and issubclass(exc_type, Exception)
