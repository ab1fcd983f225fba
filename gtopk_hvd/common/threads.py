"""How many intra-op threads each rank uses when several ranks share a host.

PyTorch and TensorFlow start as many intra-op threads as the host has cores.  With P ranks on
one host that is P times too many: the ranks' threads preempt each other, and small
operations (the library's k-sized merges and selections, the user's small layers) wait for
threads that another rank holds.  ``torchrun`` sets one thread per process for that reason.
At ``init()`` the adapters give each rank its share of the host's cores when the ranks on
the host would otherwise ask for more threads than there are cores
(``benchmarks/bench_thread_policy.py`` measures what it buys).  With one rank per host, or
when the user chose (``OMP_NUM_THREADS`` set, or ``GTOPK_HVD_THREADS``), nothing changes.

``GTOPK_HVD_THREADS``: ``keep`` leaves the threads alone; a positive integer sets them.
"""
import os

__all__ = ["THREADS_ENV", "threads_for", "host_cores"]

THREADS_ENV = "GTOPK_HVD_THREADS"


def host_cores():
    """The logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(current, cores, local_size, environ=None):
    """The intra-op thread count a rank should switch to, or None to leave ``current`` as is.

    Args:
        current: the framework's intra-op threads now.
        cores: logical CPUs of the host (:func:`host_cores`).
        local_size: ranks on this host (``hvd.local_size()``).
        environ: the environment (``os.environ`` by default).
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(THREADS_ENV, "").strip()
    if chosen:
        if chosen == "keep":
            return None
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{THREADS_ENV} must be 'keep' or a positive integer, got "
                             f"{chosen!r}")
        return int(chosen) if int(chosen) != current else None
    if environ.get("OMP_NUM_THREADS", "").strip() or local_size <= 1:
        return None
    share = max(1, cores // local_size)
    return share if current * local_size > cores and current > share else None
