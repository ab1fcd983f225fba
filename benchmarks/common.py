"""Shared plumbing of the benchmark scripts: networks, running a worker on an emulated cluster,
per-rank byte counters, CSV / Markdown output.

A benchmark script is both the launcher (its ``main``) and the worker (``--worker``): the
launcher builds a :class:`benchmarks.cluster.Cluster` per (network, P), runs the same script on
every rank with a JSON config, and rank 0 writes one JSON result file the launcher reads.

On real hosts the same script runs under ``horovodrun`` (``horovodrun -np 8 -H a:4,b:4 python
benchmarks/bench_collective.py --procs 8``): every process is then a rank, and
:func:`run_workers` runs the worker in place on the job's own network instead of building a
cluster (:func:`launched_by_horovodrun`).  Each invocation measures one configuration; rank 0
writes the results (network label ``hosts``), the other ranks exit after the worker.
"""
import csv
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import Cluster, cluster_label, iface_bytes  # noqa: E402
from gtopk_hvd.common.process_sets import world_size_before_init  # noqa: E402

__all__ = ["ROOT", "RESULTS", "NETWORKS", "SETTINGS", "cpu_busy", "wait_for_quiet",
           "launched_by_horovodrun",
           "read_csv", "merge_rows", "run_workers", "write_csv", "markdown_table",
           "WireCounter", "median", "worker_env", "load_config", "save_result", "setup_logging",
           "load_example"]

logger = logging.getLogger("gtopk_bench")

# GTOPK_BENCH_RESULTS: another directory for the CSV / Markdown / plots (tests use it)
RESULTS = Path(os.environ.get("GTOPK_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
# name -> (tc rate, delay); 'unshaped' has no tc at all
NETWORKS = {"1gbit": ("1gbit", "0.1ms"), "10gbit": ("10gbit", "0.1ms"),
            "unshaped": (None, 0)}


def load_example(filename="pytorch_mnist1d.py"):
    """Import ``examples/<filename>`` as a module (its model and data, without running it)."""
    import importlib.util
    examples = ROOT / "examples"
    if str(examples) not in sys.path:  # the examples import examples/mnist1d_shared.py
        sys.path.insert(0, str(examples))
    spec = importlib.util.spec_from_file_location(Path(filename).stem + "_example",
                                                  examples / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def worker_env():
    """Environment of every rank: one thread per process (2 cores, up to 8 ranks)."""
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_USE_LEGACY_KERAS": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": "300",
        "PYTHONUNBUFFERED": "1"}


# Runtime settings of the ranks.  'default': Horovod's and glibc's defaults.  'tuned': a 5 ms
# Horovod cycle (HOROVOD_CYCLE_TIME; the background coordination of the global and pair process
# sets every 1 ms costs about a third of a core per rank, which 4-8 ranks on 2 cores cannot
# afford) and transparent huge pages for malloc (first-touch page faults of the 100 MB
# temporaries cost 4x the arithmetic on this VM).  Both are user-level knobs, no code change.
# 'sleep': gtopk_hvd waits for its Horovod operations by polling with sleeps
# (GTOPK_HVD_WAIT=sleep), as it does by itself where a host has more ranks than cores; the
# emulated cluster gives every rank a host of its own (local size 1) on cores they all share,
# so there 'default' keeps Horovod's yield loop and 'sleep' says what the sharing calls for.
SETTINGS = {"default": {},
            "tuned": {"HOROVOD_CYCLE_TIME": "5", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
            "sleep": {"GTOPK_HVD_WAIT": "sleep"}}


def cpu_busy(seconds=1.0):
    """Fraction of the machine's CPU time spent busy over ``seconds`` (from /proc/stat)."""
    def snap():
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_busy=0.2, timeout=900.0):
    """Wait until other work (other people's tests on the same 2 cores) leaves the CPUs mostly
    idle, so that timings are not theirs; give up after ``timeout`` s.  Returns the busy
    fraction seen last (recorded with the results)."""
    deadline = time.time() + timeout
    busy = cpu_busy()
    waited = False
    while busy > max_busy and time.time() < deadline:
        if not waited:
            logger.info("CPUs %.0f%% busy with other work: waiting up to %.0f s for quiet",
                        busy * 100, timeout)
            waited = True
        time.sleep(5)
        busy = cpu_busy(2.0)
    if busy > max_busy:
        logger.warning("CPUs still %.0f%% busy with other work: timings will be slower",
                       busy * 100)
    return busy


_RANK_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # horovodrun, mpirun


def _launcher_rank():
    """This process's rank from the launcher's environment, or None."""
    return next((int(os.environ[v]) for v in _RANK_ENV if v in os.environ), None)


def launched_by_horovodrun():
    """Whether this process is a rank of a job that horovodrun (or mpirun) started on real
    hosts, rather than the launcher of an emulated cluster or one of its workers."""
    return (_launcher_rank() is not None and "--worker" not in sys.argv
            and cluster_label() == "loopback")


_in_place_runs = []


def _run_in_place(script, network, config):
    """:func:`run_workers` on real hosts: this process is one rank; run the worker here."""
    if _in_place_runs:
        raise RuntimeError(
            "under horovodrun each invocation measures one configuration (the job's own "
            "network and size): pass one network, one value of --procs (and one seed)")
    _in_place_runs.append(network)
    rank = _launcher_rank()
    tmp = Path(tempfile.mkdtemp(prefix=f"gtopk_bench_rank{rank}_"))
    cfg_path, out_path = tmp / "config.json", tmp / "result.json"
    cfg_path.write_text(json.dumps(config))
    module = _script_module(script)
    argv, t0 = sys.argv, time.time()
    sys.argv = [str(script), "--worker", str(cfg_path), str(out_path)]
    try:
        worker = getattr(module, "worker_tf" if config.get("framework") == "tf" else "worker")
        worker()
    finally:
        sys.argv = argv
    if rank != 0:
        sys.exit(0)
    info = {"network": "hosts", "label": "hosts", "P": world_size_before_init(), "foreign_cpu": float("nan"),
            "delay_emulated": False, "fallback": None, "wall_s": time.time() - t0}
    return json.loads(out_path.read_text()), info


def _script_module(script):
    """The module of the benchmark ``script``: the running one (``__main__``) when it is
    that script, else imported from its file."""
    main = sys.modules.get("__main__")
    if main is not None and Path(getattr(main, "__file__", "")).resolve() == \
            Path(script).resolve():
        return main
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench_worker", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_workers(script, size, network, config, mode="auto", check=True, timeout=3600,
                log_dir=None, env=None, quiet_timeout=900.0, ranks_per_host=1):
    """Run ``script --worker CONFIG OUT`` on a cluster of ``size`` ranks on ``network``,
    ``ranks_per_host`` of them on each emulated host (benchmarks/cluster.py).

    Returns (result, info): rank 0's JSON result and a dict describing the cluster (label,
    measured link rates, fallback reason).  Raises RuntimeError when a rank fails; its log
    is in ``log_dir`` (benchmarks/results/tmp/<script>-<network>-P<size> by default).

    Under horovodrun on real hosts (:func:`launched_by_horovodrun`) the worker runs in this
    process on the job's own ranks; ``size`` and ``network`` are then what the job has
    (label ``hosts``).
    """
    if launched_by_horovodrun():
        return _run_in_place(script, network, config)
    rate, delay = NETWORKS[network]
    if size % ranks_per_host:
        raise ValueError(f"size={size} is not a multiple of ranks_per_host={ranks_per_host}")
    hosts = size // ranks_per_host
    log_dir = Path(log_dir or RESULTS / "tmp" / f"{Path(script).stem}-{network}-P{size}")
    with tempfile.TemporaryDirectory(prefix="gtopk_bench_") as tmp:
        cfg_path, out_path = Path(tmp, "config.json"), Path(tmp, "result.json")
        cfg_path.write_text(json.dumps(config))
        foreign = wait_for_quiet(timeout=quiet_timeout) if quiet_timeout else float("nan")
        with Cluster(hosts, rate=rate, delay=delay, mode=mode,
                     ranks_per_host=ranks_per_host) as cluster:
            info = {"network": network, "label": cluster.label, "P": size,
                    "hosts": hosts, "ranks_per_host": ranks_per_host,
                    "foreign_cpu": foreign,
                    "delay_emulated": cluster.delay_emulated,
                    "fallback": cluster.fallback_reason}
            if check and cluster.mode == "netns" and rate is not None and hosts >= 2:
                links = cluster.check_links()
                info.update(link_gbit=links["h0_to_h1_gbit"], rtt_us=links["rtt_us"],
                            tcp_overhead=links.get("tcp_overhead", float("nan")))
                logger.info("%s P=%d: link h0->h1 %.3f Gbit/s, RTT %.0f us", cluster.label,
                            size, links["h0_to_h1_gbit"], links["rtt_us"])
            t0 = time.time()
            codes = cluster.run([sys.executable, str(script), "--worker", str(cfg_path),
                                 str(out_path)], env={**worker_env(), **(env or {})},
                                timeout=timeout, log_dir=log_dir)
            info["wall_s"] = time.time() - t0
        if any(codes) or not out_path.exists():
            tails = []
            for r in range(size):
                p = log_dir / f"rank.{r}.log"
                if p.exists():
                    tails.append(f"--- rank {r} ---\n" + p.read_text()[-3000:])
            raise RuntimeError(f"{script} on {info['label']} P={size} failed, exit codes "
                               f"{codes}; logs in {log_dir}\n" + "\n".join(tails))
        return json.loads(out_path.read_text()), info


def load_config():
    """In a worker: (config dict, output path) from ``--worker CONFIG OUT``."""
    i = sys.argv.index("--worker")
    return json.loads(Path(sys.argv[i + 1]).read_text()), Path(sys.argv[i + 2])


def save_result(path, result):
    Path(path).write_text(json.dumps(result, indent=1))


class WireCounter:
    """Bytes this rank's interface sent / received over a block of calls (netns only).

    On loopback the counters are shared by all ranks, so :meth:`delta` returns NaN there.
    """

    def __init__(self):
        self.enabled = cluster_label() != "loopback"
        self._start = (0, 0)

    def start(self):
        self._start = iface_bytes() if self.enabled else (0, 0)

    def delta(self):
        if not self.enabled:
            return float("nan"), float("nan")
        tx, rx = iface_bytes()
        return tx - self._start[0], rx - self._start[1]


def write_csv(path, rows, fields=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
    return path


def read_csv(path):
    """Rows of a CSV written by :func:`write_csv`, numbers parsed back."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse(v):
    if v in ("True", "False"):
        return v == "True"
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v


def merge_rows(old, new, key):
    """``old`` rows updated with ``new`` ones, matched on the columns ``key``, in key order."""
    def k(r):
        return tuple(r.get(c) for c in key)
    def order(r):  # numbers as numbers, before strings
        return tuple((0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x)) for x in k(r))
    merged = {k(r): r for r in old}
    merged.update({k(r): r for r in new})
    return sorted(merged.values(), key=order)


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def markdown_table(rows, columns):
    """``columns``: list of (header, key or callable(row), format spec)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, spec in columns:
            v = key(r) if callable(key) else r.get(key)
            if isinstance(v, float) and math.isnan(v):
                cells.append("n/a")
            elif spec and v is not None and not isinstance(v, str):
                cells.append(format(v, spec))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
