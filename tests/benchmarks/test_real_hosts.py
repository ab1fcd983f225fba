"""The benchmark scripts run unchanged under horovodrun, as on real hosts (no namespaces):
every process is a rank, the worker runs in place, rank 0 writes the results.

Here horovodrun starts 2 ranks on localhost, which is what ``-H host1:1,host2:1`` does on two
hosts apart from the network; the results go to a temporary directory
(GTOPK_BENCH_RESULTS), labelled ``hosts``.  The launcher is the suite's (tests/hvdrun.py:
horovodrun without its 5 s build probe; the demo test runs the plain command).
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import HOROVODRUN

ROOT = Path(__file__).resolve().parents[2]


def _horovodrun(tmp_path, script, *args, np_=2):
    env = dict(os.environ, GTOPK_BENCH_RESULTS=str(tmp_path), OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="3", HOROVOD_GLOO_TIMEOUT_SECONDS="120",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [*HOROVODRUN, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable,
           str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_benchmark_runs_under_horovodrun_and_rank_0_reports(tmp_path):
    out = _horovodrun(tmp_path, "bench_end_to_end.py", "--models", "resnet20", "--methods",
                      "dense,auto", "--iters", "1", "--warmup", "1", "--procs", "2")
    rows = _rows(tmp_path / "end_to_end.csv")
    assert sorted(r["method"] for r in rows) == ["auto", "dense"], rows
    assert [r["chose"] for r in rows if r["method"] == "auto"][0], rows  # what auto chose
    assert all(r["network"] == "hosts" and r["P"] == "2" for r in rows), rows
    assert all(float(r["samples_per_s"]) > 0 for r in rows), rows
    assert "End-to-end training" in out and (tmp_path / "end_to_end.md").exists()


def test_collective_benchmark_runs_under_horovodrun(tmp_path):
    out = _horovodrun(tmp_path, "bench_collective.py", "--sizes", "100000", "--densities",
                      "0.01", "--procs", "2", "--networks", "1gbit", "--reps", "2",
                      "--methods", "dense,gtopk,auto")
    rows = _rows(tmp_path / "collective.csv")
    assert rows and all(r["network"] == "hosts" and r["P"] == "2" for r in rows), rows
    assert {r["method"] for r in rows} == {"dense", "gtopk", "auto"}, rows
    assert [r["chose"] for r in rows if r["method"] == "auto"][0] in ("dense", "gtopk"), rows
    assert "auto / best fixed method, worst of 1 rows" in out, out[-3000:]
