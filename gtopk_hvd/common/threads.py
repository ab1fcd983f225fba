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
import logging
import os

__all__ = ["THREADS_ENV", "threads_for", "host_cores", "share_threads"]

logger = logging.getLogger(__name__)

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
    return share if current > share else None  # then the ranks together ask for more than cores


def share_threads(current, apply, local_size, rank):
    """The policy at ``init()``: switch this rank to :func:`threads_for`'s count, if any, with
    ``apply(threads)`` (False when the framework can no longer change them), and say so once.
    Returns the threads now in use."""
    cores = host_cores()
    threads = threads_for(current, cores, local_size)
    if threads is None:
        return current
    if not apply(threads):
        logger.info("gtopk_hvd: the framework started before init(); intra-op threads stay %d "
                    "with %d ranks on %d cores (set %s=%d before it starts)", current,
                    local_size, cores, THREADS_ENV, threads)
        return current
    if rank == 0:
        logger.info("gtopk_hvd: %d intra-op threads per rank instead of %d (%d ranks on this "
                    "host, %d cores; %s=keep leaves them)", threads, current, local_size, cores,
                    THREADS_ENV)
    return threads
