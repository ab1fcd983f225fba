"""Network-namespace plumbing of the emulated cluster (benchmarks/cluster.py).

Units ('1gbit', '0.1ms'), whether namespaces can be made here, the namespaces this package
made (all named gtkb<pid>x<n>-<role>) and their cleanup, running code inside a namespace from
this process, and what a rank calls to read its own interface's byte counters.
"""
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["ClusterError", "PREFIX", "SUBNET", "SWITCH_IP", "IFACE_ENV", "LABEL_ENV",
           "parse_rate", "parse_time", "fmt_rate", "iface_bytes", "cluster_label",
           "netns_support", "namespaces", "cleanup", "run_in_netns", "sh", "kill_netns_pids",
           "ETC_NETNS"]

logger = logging.getLogger("gtopk_bench.cluster")

PREFIX = "gtkb"  # every namespace this package makes is named gtkb<pid>x<n>-<role>
_NAME_RE = re.compile(r"^%s(\d+)x(\d+)-(br|h\d+)$" % PREFIX)
SUBNET = "10.77.0"  # addresses exist only inside the cluster's own namespaces
SWITCH_IP = f"{SUBNET}.254"
IFACE_ENV = "GTOPK_CLUSTER_IFACE"
LABEL_ENV = "GTOPK_CLUSTER_LABEL"
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` mounts
_CLONE_NEWNET = 0x40000000


class ClusterError(RuntimeError):
    """The emulated cluster could not be built or a rank failed."""


# ---------------------------------------------------------------------------------------------
# units

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "usec": 1e-6, "msec": 1e-3, "sec": 1.0}


def parse_rate(rate):
    """'1gbit' -> 1e9 bits/s; None, '', 'none', 'unshaped', 0 -> None (no shaping)."""
    if rate is None or str(rate).lower() in ("", "0", "none", "unshaped", "inf"):
        return None
    if isinstance(rate, (int, float)):
        return float(rate)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"rate must look like '1gbit', '10gbit', '100mbit' or 'unshaped', "
                         f"got {rate!r}")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_time(value):
    """'0.1ms' -> 1e-4 s; None / '' / '0' -> 0."""
    if value is None or str(value) in ("", "0", "none"):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", str(value))
    if not m or (m.group(2) or "s") not in _TIME_UNITS:
        raise ValueError(f"delay must look like '0.1ms', '50us' or '0', got {value!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]


def fmt_rate(bits):
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


# ---------------------------------------------------------------------------------------------
# what a rank calls

def iface_bytes(iface=None):
    """(tx_bytes, rx_bytes) of this rank's interface (``GTOPK_CLUSTER_IFACE``, default eth0).

    Inside a namespace started with ``ip netns exec``, /sys shows that namespace's interfaces.
    On loopback the counters are shared by all ranks: per-rank numbers are not meaningful.
    """
    iface = iface or os.environ.get(IFACE_ENV, "eth0")
    base = Path("/sys/class/net", iface, "statistics")
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def cluster_label():
    """The label of the cluster this rank runs in ('loopback' outside any cluster)."""
    return os.environ.get(LABEL_ENV, "loopback")


# ---------------------------------------------------------------------------------------------
# namespaces

def _ip_available():
    return shutil.which("ip") is not None and shutil.which("tc") is not None


def netns_support():
    """(True, '') if network namespaces can be made here, else (False, the reason)."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "network namespaces need root (this process is not uid 0)"
    if not _ip_available():
        return False, "the 'ip' and 'tc' commands (iproute2) are not installed"
    name = f"{PREFIX}{os.getpid()}x0-probe"
    try:
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                             timeout=20)
        if res.returncode != 0:
            return False, f"'ip netns add' failed: {res.stderr.strip()}"
        return True, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"'ip netns add' failed: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def sh(*args, check=True, timeout=30):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise ClusterError(f"`{' '.join(map(str, args))}` failed: {res.stderr.strip()}")
    return res


def namespaces(owner=None):
    """Names of this module's namespaces that exist now (of process ``owner`` if given)."""
    out = []
    for name in _list_netns():
        m = _NAME_RE.match(name)
        if m and (owner is None or int(m.group(1)) == owner):
            out.append(name)
    return out


def _list_netns():
    res = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def kill_netns_pids(name, sig=signal.SIGKILL):
    res = sh("ip", "netns", "pids", name, check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), sig)
        except (ProcessLookupError, ValueError):
            pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cleanup(force=False, owner=None):
    """Remove leftover namespaces named gtkb<pid>x<n>-* (and kill what runs in them).

    Without ``force`` only those whose creating process is gone; with ``force`` all of them,
    including those of a cluster that is running right now.  ``owner``: only those created by
    that process id.  Returns the names removed.
    """
    removed = []
    for name in _list_netns():
        m = _NAME_RE.match(name) or re.match(r"^%s(\d+)x0-probe$" % PREFIX, name)
        if not m or (owner is not None and int(m.group(1)) != owner):
            continue
        pid = int(m.group(1))
        if not force and pid != os.getpid() and _pid_alive(pid):
            continue
        kill_netns_pids(name)
        sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    for d in ETC_NETNS.glob(f"{PREFIX}*") if ETC_NETNS.is_dir() else []:
        m = _NAME_RE.match(d.name)
        if not m or (owner is not None and int(m.group(1)) != owner):
            continue
        if (force or not _pid_alive(int(m.group(1)))) and d.name not in _list_netns():
            shutil.rmtree(d, ignore_errors=True)
    return removed


def run_in_netns(name, fn):
    """Run ``fn()`` in a new thread that has joined network namespace ``name``; return its value.

    setns(CLONE_NEWNET) changes only the calling thread, and a socket keeps the namespace it was
    made in, so servers and clients can live in a namespace while this process stays outside.
    """
    box = {}

    def target():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------------
