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

Waiting for a Horovod operation: Horovod's ``synchronize(handle)`` waits in a loop of
``sched_yield`` calls.  With more ranks than cores on a host, the waiting ranks' loops take
the cores from the ranks still computing (and from Horovod's background threads), so an
exchange waits longer for the very partner it is waiting for.  :func:`waits_politely` says
when the library waits by polling with short sleeps instead (``GTOPK_HVD_WAIT``: ``sleep`` /
``spin`` to choose; by default sleep when the host has more ranks than cores).
"""
import logging
import os

__all__ = ["THREADS_ENV", "WAIT_ENV", "threads_for", "host_cores", "share_threads",
           "waits_politely", "sleeps"]

logger = logging.getLogger(__name__)

THREADS_ENV = "GTOPK_HVD_THREADS"
WAIT_ENV = "GTOPK_HVD_WAIT"
_FIRST_SLEEP, _LONGEST_SLEEP = 2e-5, 5e-4  # seconds


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


def waits_politely(cores, local_size, environ=None):
    """Whether to wait for Horovod operations by polling with sleeps (:func:`sleeps`) rather
    than with Horovod's yield loop: with ``GTOPK_HVD_WAIT=sleep``, or by default when the
    ``local_size`` ranks of the host outnumber its ``cores``."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(WAIT_ENV, "").strip()
    if chosen not in ("", "sleep", "spin"):
        raise ValueError(f"{WAIT_ENV} must be 'sleep' or 'spin', got {chosen!r}")
    return chosen == "sleep" or (not chosen and local_size > cores)


def sleeps():
    """The sleeps between two polls of a wait: 20 microseconds, doubling up to 0.5 ms, so a
    short wait stays short and a long one costs a poll every half millisecond."""
    delay = _FIRST_SLEEP
    while True:
        yield delay
        delay = min(2 * delay, _LONGEST_SLEEP)
