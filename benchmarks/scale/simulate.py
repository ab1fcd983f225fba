"""Run communication programs on a SimGrid platform: the flow-level network model, one actor a rank.

Platform (:class:`Platform`): N nodes of L ranks.  Each node has one network card (a
split-duplex link of ``net_gbit`` to a non-blocking switch: every message between nodes
crosses the sender's card up and the receiver's card down, so the L ranks of a node share
their card); inside a node each rank has its own link (``intra_gbit``: PCIe or NVLink class)
to the node's fabric.  With L = 1 a rank's link is its card: the flat cluster of the ICDCS
paper and of benchmarks/cluster.py (one network namespace a rank, every link shaped both ways).

Network model: SimGrid's LV08 (max-min sharing of every link among its flows, TCP's
bandwidth factor 0.97, and its cross traffic: a flow's acknowledgements take 5% of the
reverse path, so two ranks that swap sets each get 0.97 / 1.05 of the link), with latency
factor 1: link latencies are one-way times derived from measured round trips (SimGrid's
default factor 13.01 stands for TCP's slow start on long-distance links, which a data-centre
network with warm connections does not pay).

Programs (:mod:`benchmarks.scale.programs` builds them from gtopk_hvd.common): per rank a list
of operations, the same collectives in the same order on every rank (the project's rule):

- ``("sleep", seconds)``: local work, or Horovod's per-operation negotiation;
- ``("ring", members, step_bytes, steps)``: ``steps`` steps of a ring (Gloo's ring allreduce:
  reduce-scatter then allgather, every member sends ``step_bytes`` to its right neighbour);
- ``("gather", members, {member: bytes})``: Gloo's ring allgatherv in ``members``;
- ``("alltoall", members, bytes)``: every member sends ``bytes`` to every other.

Long rings are symmetric (every step moves the same bytes over the same links), so a ring (or
an allgatherv of equal blocks) of more than :data:`EXACT_STEPS` steps runs its first two steps
in SimGrid and then waits the second step's duration for each remaining step.

SimGrid allows one engine per process: :func:`run_programs` simulates in a forked child.
"""
import importlib.util
import multiprocessing
import os
from dataclasses import dataclass

__all__ = ["Platform", "run_programs", "available", "EXACT_STEPS"]

EXACT_STEPS = 8


def available():
    """Whether the SimGrid Python bindings import (benchmarks/scale/setup.sh installs them)."""
    return importlib.util.find_spec("simgrid") is not None


@dataclass(frozen=True)
class Platform:
    """``nodes`` x ``ranks_per_node``; bandwidths in Gbit/s, latencies one-way per link in s."""
    nodes: int
    ranks_per_node: int
    net_gbit: float
    net_latency_s: float = 25e-6
    intra_gbit: float = 100.0
    intra_latency_s: float = 1e-6

    @property
    def size(self):
        return self.nodes * self.ranks_per_node

    def node_of(self, rank):
        return rank // self.ranks_per_node


def _build(engine, platform, pairs):
    from simgrid import LinkInRoute, NetZone
    up, down = LinkInRoute.Direction.UP, LinkInRoute.Direction.DOWN
    zone = NetZone.create_full_zone("cluster")
    hosts = [zone.create_host(f"r{r}", 1e9).seal() for r in range(platform.size)]
    nic = [zone.create_split_duplex_link(f"nic{n}", platform.net_gbit * 1e9 / 8)
           .set_latency(platform.net_latency_s).seal() for n in range(platform.nodes)]
    intra = [zone.create_split_duplex_link(f"pci{r}", platform.intra_gbit * 1e9 / 8)
             .set_latency(platform.intra_latency_s).seal() for r in range(platform.size)] \
        if platform.ranks_per_node > 1 else None
    for a, b in sorted(pairs):
        na, nb = platform.node_of(a), platform.node_of(b)
        links = []
        if intra:
            links.append(LinkInRoute(intra[a], up))
        if na != nb:
            links += [LinkInRoute(nic[na], up), LinkInRoute(nic[nb], down)]
        if intra:
            links.append(LinkInRoute(intra[b], down))
        zone.add_route(hosts[a].netpoint, hosts[b].netpoint, None, None, links, False)
    zone.seal()
    return hosts


def _pairs(programs):
    pairs = set()
    for rank, program in enumerate(programs):
        for op in program:
            kind = op[0]
            if kind in ("ring", "gather"):
                members = op[1]
                i = members.index(rank)
                pairs.add((rank, members[(i + 1) % len(members)]))
            elif kind == "alltoall":
                pairs.update((rank, m) for m in op[1] if m != rank)
    return pairs


def _rank_actor(rank, program, finish):
    from simgrid import Engine, Mailbox, this_actor

    def box(src, dst):
        return Mailbox.by_name(f"{src}>{dst}")

    def ring_step(right, left, nbytes):
        comm = box(rank, right).put_async(None, max(1, int(nbytes)))
        box(left, rank).get()
        comm.wait()

    for op in program:
        kind = op[0]
        if kind == "sleep":
            if op[1] > 0:
                this_actor.sleep_for(op[1])
        elif kind == "ring":
            members, step_bytes, steps = op[1], op[2], op[3]
            if len(members) < 2 or steps == 0:
                continue
            i = members.index(rank)
            right, left = members[(i + 1) % len(members)], members[(i - 1) % len(members)]
            exact = steps if steps <= EXACT_STEPS else 2
            start = Engine.clock
            for s in range(exact):
                if s == exact - 1:
                    start = Engine.clock
                ring_step(right, left, step_bytes)
            if exact < steps:
                this_actor.sleep_for((Engine.clock - start) * (steps - exact))
        elif kind == "gather":
            members, blocks = op[1], op[2]
            n = len(members)
            i = members.index(rank)
            right, left = members[(i + 1) % n], members[(i - 1) % n]
            equal = len(set(blocks.values())) == 1
            exact = n - 1 if not equal or n - 1 <= EXACT_STEPS else 2
            for s in range(exact):  # step s forwards the block of member i - s
                if s == exact - 1:
                    start = Engine.clock
                ring_step(right, left, blocks[members[(i - s) % n]])
            if exact < n - 1:  # equal blocks: every step as the last one simulated
                this_actor.sleep_for((Engine.clock - start) * (n - 1 - exact))
        elif kind == "alltoall":
            members, nbytes = op[1], op[2]
            comms = [box(rank, m).put_async(None, max(1, int(nbytes)))
                     for m in members if m != rank]
            for m in members:
                if m != rank:
                    box(m, rank).get()
            for c in comms:
                c.wait()
        else:
            raise ValueError(f"unknown operation {kind!r}")
    finish[rank] = Engine.clock


def _simulate(platform, programs, conn):
    try:
        from simgrid import Actor, Engine
        engine = Engine(["scale", "--log=root.thres:critical",
                         "--cfg=network/model:LV08", "--cfg=network/latency-factor:1",
                         "--cfg=contexts/factory:thread"])
        hosts = _build(engine, platform, _pairs(programs))
        finish = {}
        for rank, program in enumerate(programs):
            Actor.create(f"rank{rank}", hosts[rank], _rank_actor, rank, program, finish)
        engine.run()
        conn.send(("ok", [finish[r] for r in range(len(programs))]))
    except BaseException as err:  # report to the parent, never hang it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
        os._exit(0)


def run_programs(platform, programs):
    """Simulate ``programs`` (one list of operations per rank) on ``platform``; return each
    rank's finish time in seconds."""
    if len(programs) != platform.size:
        raise ValueError(f"{len(programs)} programs for a platform of {platform.size} ranks")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_simulate, args=(platform, programs, child))
    proc.start()
    child.close()
    status, value = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"SimGrid simulation failed: {value}")
    return value
