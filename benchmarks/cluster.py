"""An emulated cluster on one machine: N hosts as Linux network namespaces, L Horovod ranks each.

Topology (nothing is created in, or routed through, the caller's network namespace)::

    namespace <prefix>-h0   eth0 10.77.0.1 --veth-- vh0 \
    namespace <prefix>-h1   eth0 10.77.0.2 --veth-- vh1  }- br0 10.77.0.254 in namespace <prefix>-br
    ...                                                 /   (the "switch"; Horovod's rendezvous
                                                             server listens there)

Every host link is shaped in both directions with tc (HTB at ``rate`` on the host's ``eth0``,
its upload, and on the switch port ``vh<i>``, its download), with a netem ``delay`` leaf where
the kernel has sch_netem.  A host-to-host message crosses two links, as through a real switch.
Where sch_netem is missing (as in the kernel this project was measured on) the delay is not
added, a warning says so, ``delay_emulated`` is False and the label carries no delay;
:meth:`Cluster.check_links` measures the RTT the links have anyway.  On links of at most
2.5 Gbit/s the veths' GSO packets are capped at 16 KiB so that a 200 KB message cannot slip
through the shaper in a few 64 KiB bursts.

Horovod 0.28 creates the Gloo device of every process set from the host name rather than
HOROVOD_GLOO_IFACE, so each host namespace gets /etc/netns/<ns>/hosts (mounted over
/etc/hosts by ``ip netns exec``) in which the machine's host name is that namespace's address.
The ranks get the environment horovodrun's Gloo launcher gives them (horovod/runner/gloo_run.py:
rendezvous address and port, controller and CPU operations "gloo", interface, hostname, rank,
size, local and cross rank / size), one rank per namespace, so Horovod's traffic between ranks
really goes through the shaped links and the per-interface byte counters measure it.

Without root, without ``ip`` or without network-namespace support, :class:`Cluster` falls back
to a horovodrun-like local launch on loopback, and says so: ``cluster.label`` is "loopback"
and every output of the benchmarks carries that label.

Library use::

    with Cluster(hosts=4, rate="1gbit", delay="0.1ms") as cluster:
        print(cluster.label, cluster.check_links())
        codes = cluster.run([sys.executable, "train.py"])

Command line (exit code: the first failing rank's, else 0)::

    python benchmarks/cluster.py --hosts 4 --rate 1gbit --delay 0.1ms -- python train.py
    python benchmarks/cluster.py --hosts 2 --check        # measure rate and RTT, run nothing
    python benchmarks/cluster.py --cleanup                # remove leftovers of dead runs

With ``ranks_per_host=L`` (``--ranks-per-host``) each namespace holds L ranks, numbered host
by host as horovodrun numbers them (local rank, local size, cross rank and size as on real
nodes): their traffic to each other stays on the namespace's own loopback (the kernel delivers
a packet to a local address through ``lo``, never through the shaped ``eth0``), traffic to
other hosts crosses the shaped links, and a host's ``eth0`` counters measure what left the
node.  This is how hierarchical gTop-k is benchmarked (benchmarks/bench_hierarchical.py).

A rank can read its own interface's byte counters with :func:`iface_bytes` (the launcher sets
``GTOPK_CLUSTER_IFACE`` and ``GTOPK_CLUSTER_LABEL`` in its environment).
"""
import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.netns import (ETC_NETNS, IFACE_ENV, LABEL_ENV, PREFIX, SUBNET,  # noqa: F401
                              SWITCH_IP, ClusterError, cleanup, cluster_label, fmt_rate,
                              iface_bytes, kill_netns_pids, namespaces, netns_support,
                              parse_rate, parse_time, run_in_netns, sh)

__all__ = ["Cluster", "ClusterError", "parse_rate", "parse_time", "netns_support", "cleanup",
           "namespaces", "install_signal_handlers", "iface_bytes", "cluster_label", "PREFIX",
           "SWITCH_IP", "main"]

logger = logging.getLogger("gtopk_bench.cluster")

_counter = iter(range(1, 1 << 30))
_live = set()  # clusters not closed yet, closed at exit


# ---------------------------------------------------------------------------------------------
# the cluster

class Cluster:
    """N emulated hosts with shaped links, or a loopback fallback.  Use as a context manager.

    Args:
        hosts: number of hosts.
        rate: per-link rate in both directions ('1gbit', '10gbit', ...; 'unshaped' or None for
            no shaping).
        delay: one-way delay added on each link direction ('0.1ms'); needs sch_netem in the
            kernel, otherwise it is reported as not emulated (``delay_emulated`` False).
        mode: 'auto' (namespaces if possible, else loopback), 'netns' (fail if impossible) or
            'loopback'.
        gso_max_size: cap on the veths' GSO packet size in bytes.  'auto': 16384 on links of
            at most 2.5 Gbit/s (a 64 KiB GSO packet would pass at once and make a 200 KB message
            about 30% faster than the rate; 16 KiB keeps it within about 5%), the kernel's
            default (64 KiB) on faster or unshaped links, where smaller packets cost too much
            CPU here.  None: the kernel's default.
        ranks_per_host: Horovod ranks on each host (L); the job has ``hosts * L`` ranks.
    """

    def __init__(self, hosts, rate="1gbit", delay="0.1ms", mode="auto", gso_max_size="auto",
                 ranks_per_host=1):
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be an int in [1, 200], got {hosts!r}")
        if isinstance(ranks_per_host, bool) or not isinstance(ranks_per_host, int) or \
                not 1 <= ranks_per_host <= 64:
            raise ValueError(f"ranks_per_host must be an int in [1, 64], got {ranks_per_host!r}")
        if mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"mode must be 'auto', 'netns' or 'loopback', got {mode!r}")
        self.hosts, self.ranks_per_host = hosts, ranks_per_host
        self.size = hosts * ranks_per_host
        self.rate_bits = parse_rate(rate)
        self.delay_s = parse_time(delay)
        if gso_max_size == "auto":
            gso_max_size = 16384 if self.rate_bits is not None and self.rate_bits <= 2.5e9 else None
        self.gso_max_size = gso_max_size
        self.requested_mode = mode
        self.mode = None
        self.fallback_reason = ""
        self.delay_emulated = False
        self._prefix = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self._namespaces = []
        self._procs = []
        self._lock = threading.Lock()

    # -- names -------------------------------------------------------------------------------
    @property
    def switch_ns(self):
        return f"{self._prefix}-br"

    def host_ns(self, i):
        return f"{self._prefix}-h{i}"

    def host_ip(self, i):
        return f"{SUBNET}.{i + 1}" if self.mode == "netns" else "127.0.0.1"

    @property
    def iface(self):
        return "eth0" if self.mode == "netns" else "lo"

    @property
    def label(self):
        """'loopback', 'netns:unshaped' or 'netns:1gbit' (+ '+0.1ms' when the delay is real)."""
        if self.mode != "netns":
            return "loopback"
        if self.rate_bits is None:
            return "netns:unshaped"
        delay = f"+{self.delay_s * 1e3:g}ms" if self.delay_emulated and self.delay_s else ""
        return f"netns:{fmt_rate(self.rate_bits)}{delay}"

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        if self.requested_mode == "loopback":
            self.mode, self.fallback_reason = "loopback", "loopback requested"
        else:
            ok, why = netns_support()
            if not ok and self.requested_mode == "netns":
                raise ClusterError(f"cannot build an emulated cluster: {why}")
            self.mode, self.fallback_reason = ("netns", "") if ok else ("loopback", why)
        _live.add(self)
        if self.mode == "loopback":
            logger.warning("emulated cluster unavailable (%s): running on loopback, unshaped",
                           self.fallback_reason)
            return self
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self):
        br = self.switch_ns
        self._add_ns(br)
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "addr", "add", f"{SWITCH_IP}/24", "dev", "br0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for i in range(self.hosts):
            h, port = self.host_ns(i), f"vh{i}"
            self._add_ns(h)
            self._write_hosts_file(h, self.host_ip(i))
            sh("ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                "netns", br)
            sh("ip", "-n", br, "link", "set", port, "master", "br0")
            sh("ip", "-n", h, "addr", "add", f"{self.host_ip(i)}/24", "dev", "eth0")
            if self.gso_max_size:
                sh("ip", "-n", h, "link", "set", "eth0", "gso_max_size", self.gso_max_size)
                sh("ip", "-n", br, "link", "set", port, "gso_max_size", self.gso_max_size)
            sh("ip", "-n", h, "link", "set", "eth0", "up")
            sh("ip", "-n", br, "link", "set", port, "up")
            if self.rate_bits is not None:  # 'unshaped': no tc at all
                self._shape(h, "eth0")  # upload
                self._shape(br, port)  # download
        self._wait_links()

    def _add_ns(self, name):
        sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    @staticmethod
    def _write_hosts_file(ns, ip):
        # Horovod 0.28 builds the Gloo device of a process set without HOROVOD_GLOO_IFACE
        # (gloo_context.cc, InitializeForProcessSet), so Gloo binds to gethostname()'s address.
        # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: there the machine's
        # host name resolves to the namespace's own eth0 address.
        d = ETC_NETNS / ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text(f"127.0.0.1 localhost\n{ip} {socket.gethostname()} {ns}\n")

    def _shape(self, ns, dev):
        # HTB at the link rate; tokens may go into debt for one large (GSO) packet, so the mean
        # rate stays right.  A small burst (20 us at line rate) keeps short transfers honest.
        leaf_parent = "root"
        if self.rate_bits is not None:
            burst = max(3200, int(self.rate_bits / 8 * 20e-6))
            rate = f"{int(self.rate_bits)}bit"
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                "default", "1", "r2q", "1000")
            sh("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
                "htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst,
                "quantum", 200000)
            leaf_parent = "parent 1:1"
        if self.delay_s:
            delay = f"{self.delay_s * 1e6:g}us"
            res = sh("tc", "-n", ns, "qdisc", "add", "dev", dev, *leaf_parent.split(), "handle",
                      "10:", "netem", "delay", delay, "limit", 100000, check=False)
            if res.returncode == 0:
                self.delay_emulated = True
            elif not getattr(self, "_warned_delay", False):
                self._warned_delay = True
                logger.warning("delay %s not emulated: this kernel has no sch_netem (%s); the "
                               "links keep their own latency (see check_links())",
                               delay, res.stderr.strip())

    def _wait_links(self, timeout=10.0):
        """Wait until the bridge ports forward (carrier up on every veth)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = sh("ip", "-n", self.switch_ns, "-o", "link", "show", "master", "br0").stdout
            if out.count("state UP") >= self.hosts:
                return
            time.sleep(0.05)
        raise ClusterError(f"bridge ports of {self.switch_ns} did not come up in {timeout}s")

    def close(self):
        """Kill every rank still running and delete the namespaces.  Safe to call twice."""
        with self._lock:
            procs, self._procs = self._procs, []
        _terminate(procs)
        for name in reversed(self._namespaces):
            kill_netns_pids(name)
            sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self._namespaces = []
        _live.discard(self)

    # -- counters ----------------------------------------------------------------------------
    def counters(self):
        """Per host: {'tx_bytes', 'rx_bytes'} of its eth0 (None on loopback)."""
        if self.mode != "netns":
            return [None] * self.hosts
        out = []
        for i in range(self.hosts):
            res = sh("ip", "-n", self.host_ns(i), "-j", "-s", "link", "show", "eth0")
            stats = json.loads(res.stdout)[0]["stats64"]
            out.append({"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"]})
        return out

    # -- measurements ------------------------------------------------------------------------
    def measure_throughput(self, src, dst, nbytes=25_000_000):
        """Bits/s of one TCP stream from ``src`` to ``dst``: host indices, or 'switch'."""
        if self.mode != "netns":
            raise ClusterError("throughput checks need the emulated cluster, this is loopback")
        ns = {h: (self.switch_ns if h == "switch" else self.host_ns(h)) for h in (src, dst)}
        ip_dst = SWITCH_IP if dst == "switch" else self.host_ip(dst)
        srv = run_in_netns(ns[dst], lambda: socket.create_server((ip_dst, 0)))
        port = srv.getsockname()[1]

        def receive():
            conn, _ = srv.accept()
            buf = bytearray(1 << 20)
            got = 0
            with conn:
                while got < nbytes:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    got += n
                conn.sendall(b"k")

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        cli = run_in_netns(ns[src], lambda: socket.create_connection((ip_dst, port), timeout=60))
        payload = memoryview(bytearray(nbytes))
        with cli:
            # sender's clock: from the first byte handed to TCP to the receiver's 1-byte ack
            t0 = time.perf_counter()
            cli.sendall(payload)
            ack = cli.recv(1)
            elapsed = time.perf_counter() - t0
        rx.join(60)
        srv.close()
        if ack != b"k":
            raise ClusterError(f"throughput probe {src} -> {dst}: the receiver did not confirm")
        return nbytes * 8 / elapsed

    def measure_rtt(self, src=0, dst=1, rounds=200):
        """Median round trip of a 1-byte TCP ping-pong between two hosts, in seconds."""
        if self.mode != "netns":
            raise ClusterError("RTT checks need the emulated cluster, this is loopback")
        dst_ip = self.host_ip(dst)
        srv = run_in_netns(self.host_ns(dst), lambda: socket.create_server((dst_ip, 0)))
        port = srv.getsockname()[1]

        def echo():
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while conn.recv(1) and conn.sendall(b"x") is None:
                    pass

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        cli = run_in_netns(self.host_ns(src), lambda: socket.create_connection((dst_ip, port), 10))
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        with cli:
            for _ in range(rounds):
                t0 = time.perf_counter()
                cli.sendall(b"x")
                cli.recv(1)
                times.append(time.perf_counter() - t0)
        t.join(10)
        srv.close()
        times.sort()
        return times[len(times) // 2]

    def check_links(self, nbytes=None):
        """Measure the shaping: upload (h0 -> switch), download (switch -> h0), h0 -> h1 and the
        RTT h0 <-> h1.  Returns a dict of Gbit/s and microseconds, with the configured rate."""
        if nbytes is None:  # about 0.2 s per transfer at the configured rate
            nbytes = int((self.rate_bits or 8e9) / 8 * 0.2)
        res = {"label": self.label, "rate_gbit": (self.rate_bits or float("nan")) / 1e9,
               "upload_gbit": self.measure_throughput(0, "switch", nbytes) / 1e9,
               "download_gbit": self.measure_throughput("switch", 0, nbytes) / 1e9}
        if self.hosts >= 2:
            before = self.counters()[0]["tx_bytes"]
            res["h0_to_h1_gbit"] = self.measure_throughput(0, 1, nbytes) / 1e9
            # bytes the interface counted per payload byte: TCP/IP headers (one per GSO packet
            # on a veth), the handshake and the probe's 1-byte acknowledgement
            res["tcp_overhead"] = (self.counters()[0]["tx_bytes"] - before) / nbytes - 1
            res["rtt_us"] = self.measure_rtt(0, 1) * 1e6
        return res

    # -- running a Horovod job -----------------------------------------------------------------
    def rank_env(self, rank, port, hostnames):
        """The environment horovodrun's Gloo launcher would give ``rank`` (gloo_run.py): on
        the namespaces, host ``rank // L`` and local rank ``rank % L``; on loopback, one host
        of every rank."""
        netns, per_host = self.mode == "netns", self.ranks_per_host
        host, local = divmod(rank, per_host)
        return {
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": SWITCH_IP if netns else "127.0.0.1",
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_GLOO_IFACE": self.iface,
            "NCCL_SOCKET_IFNAME": self.iface,
            "HOROVOD_HOSTNAME": hostnames[host if netns else 0],
            "HOROVOD_RANK": str(rank),
            "HOROVOD_SIZE": str(self.size),
            "HOROVOD_LOCAL_RANK": str(local if netns else rank),
            "HOROVOD_LOCAL_SIZE": str(per_host if netns else self.size),
            "HOROVOD_CROSS_RANK": str(host if netns else 0),
            "HOROVOD_CROSS_SIZE": str(self.hosts if netns else 1),
            "PYTHONUNBUFFERED": "1",
            IFACE_ENV: self.iface,
            LABEL_ENV: self.label,
        }

    def _start_rendezvous(self, hostnames):
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousServer

        if self.mode == "netns":
            hosts_spec = ",".join(f"{h}:{self.ranks_per_host}" for h in hostnames)
        else:
            hosts_spec = f"localhost:{self.size}"
        plan = get_host_assignments(parse_hosts(hosts_spec), self.size)
        server = RendezvousServer(verbose=0)
        if self.mode == "netns":  # the server's socket lives on the switch, not on this host
            port = run_in_netns(self.switch_ns, server.start)
        else:
            port = server.start()
        server.init(plan)
        return server, port

    def run(self, command, env=None, timeout=None, log_dir=None, quiet=False):
        """Run ``command`` (a list) as a Horovod job, ``ranks_per_host`` ranks per host; wait
        for all ranks.

        Output goes to this process's stdout/stderr prefixed with ``[rank]`` (as horovodrun
        does), or to ``log_dir/rank.<r>.log`` when given (``quiet`` drops it).  When a rank
        fails the others are terminated.  Returns the list of exit codes; raises ClusterError
        on timeout.
        """
        if self.mode is None:
            raise ClusterError("call start() (or use `with Cluster(...)`) before run()")
        hostnames = ([f"{self._prefix}-h{i}" for i in range(self.hosts)]
                     if self.mode == "netns" else ["localhost"])
        server, port = self._start_rendezvous(hostnames)
        procs, pumps = [], []
        try:
            for rank in range(self.size):
                full_env = dict(os.environ)
                full_env.update(env or {})
                full_env.update(self.rank_env(rank, port, hostnames))
                argv = [str(c) for c in command]
                if self.mode == "netns":
                    argv = ["ip", "netns", "exec",
                            self.host_ns(rank // self.ranks_per_host)] + argv
                if log_dir is not None:
                    Path(log_dir).mkdir(parents=True, exist_ok=True)
                    out = open(Path(log_dir) / f"rank.{rank}.log", "wb")
                    proc = subprocess.Popen(argv, env=full_env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                    out.close()
                else:
                    pipe = subprocess.DEVNULL if quiet else subprocess.PIPE
                    proc = subprocess.Popen(argv, env=full_env, stdout=pipe, stderr=pipe,
                                            start_new_session=True)
                    if not quiet:
                        pumps += [_pump(proc.stdout, sys.stdout, f"[{rank}]<stdout>:"),
                                  _pump(proc.stderr, sys.stderr, f"[{rank}]<stderr>:")]
                procs.append(proc)
                with self._lock:
                    self._procs.append(proc)
            codes = _wait_all(procs, timeout)
        finally:
            _terminate(procs)
            with self._lock:
                self._procs = [p for p in self._procs if p not in procs]
            for t in pumps:
                t.join(5)
            server.stop()
        return codes


def _pump(stream, sink, prefix):
    def target():
        for line in iter(stream.readline, b""):
            sink.write(prefix + line.decode(errors="replace"))
            sink.flush()
        stream.close()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def _wait_all(procs, timeout):
    """Wait for every process; terminate the rest as soon as one fails (as horovodrun does)."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            failed = next(i for i, c in enumerate(codes) if c not in (None, 0))
            logger.error("rank %d exited with %d: terminating the other ranks", failed,
                         codes[failed])
            _terminate(procs)
            return [p.wait() for p in procs]
        if deadline is not None and time.time() > deadline:
            _terminate(procs)
            raise ClusterError(f"the job did not finish in {timeout} s; ranks were killed")
        time.sleep(0.05)


def _terminate(procs, grace=5.0):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, sig)  # each rank leads its own session
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while any(p.poll() is None for p in alive) and time.time() < deadline:
            time.sleep(0.05)


@atexit.register
def _close_all():
    for cluster in list(_live):
        cluster.close()


def _raise_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def install_signal_handlers():
    """Turn SIGTERM and SIGHUP into SystemExit and SIGINT into KeyboardInterrupt (even where it
    was inherited as ignored, as in a background job), so that ``finally`` blocks and context
    managers remove the cluster.  Main thread only."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run a command as a Horovod (Gloo) job on N emulated hosts: network "
                    "namespaces with shaped links.  Falls back to loopback without root.",
        usage="%(prog)s [options] -- command [args ...]")
    parser.add_argument("--hosts", "-n", type=int, default=2, help="number of hosts")
    parser.add_argument("--ranks-per-host", type=int, default=1,
                        help="Horovod ranks on each host (L; intra-host traffic stays on its "
                             "loopback)")
    parser.add_argument("--rate", default="1gbit",
                        help="per-link rate, both directions: 1gbit, 10gbit, ... or unshaped")
    parser.add_argument("--delay", default="0.1ms", help="one-way delay per link direction")
    parser.add_argument("--mode", choices=["auto", "netns", "loopback"], default="auto")
    parser.add_argument("--gso-max-size", default="auto",
                        help="cap GSO packets on the veths (bytes; 'auto': 16384 up to 2.5gbit)")
    parser.add_argument("--check", action="store_true",
                        help="measure upload / download / host-to-host rate and RTT first")
    parser.add_argument("--cleanup", action="store_true",
                        help=f"remove leftover {PREFIX}* namespaces of dead runs, then exit")
    parser.add_argument("--force", action="store_true",
                        help="with --cleanup: also those of runs still alive")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before killing")
    parser.add_argument("--log-dir", default=None, help="per-rank logs instead of prefixed output")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cluster: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    if args.cleanup:
        removed = cleanup(force=args.force)
        print(f"removed {len(removed)} namespace(s)" + (": " + " ".join(removed)
                                                        if removed else ""))
        return 0
    if not command and not args.check:
        parser.error("nothing to run: give -- command [args], or --check")
    install_signal_handlers()
    gso = args.gso_max_size if args.gso_max_size == "auto" else int(args.gso_max_size)
    with Cluster(args.hosts, args.rate, args.delay, mode=args.mode, gso_max_size=gso,
                 ranks_per_host=args.ranks_per_host) as cluster:
        logger.info("cluster %s with %d host(s) of %d rank(s)%s", cluster.label, cluster.hosts,
                    cluster.ranks_per_host,
                    f" (fallback: {cluster.fallback_reason})" if cluster.mode != "netns" else "")
        if args.check and cluster.mode == "netns":
            for key, value in cluster.check_links().items():
                logger.info("  %-14s %s", key,
                            f"{value:.3f}" if isinstance(value, float) else value)
        if not command:
            return 0
        before = cluster.counters()
        t0 = time.time()
        codes = cluster.run(command, timeout=args.timeout, log_dir=args.log_dir)
        elapsed = time.time() - t0
        after = cluster.counters()
        logger.info("[%s] finished in %.1f s, exit codes %s", cluster.label, elapsed, codes)
        if cluster.mode == "netns":
            for i, (b, a) in enumerate(zip(before, after)):
                logger.info("  host %d: tx %.3f MB, rx %.3f MB", i,
                            (a["tx_bytes"] - b["tx_bytes"]) / 1e6,
                            (a["rx_bytes"] - b["rx_bytes"]) / 1e6)
        return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logger.error("interrupted: ranks killed, namespaces removed")
        sys.exit(130)
