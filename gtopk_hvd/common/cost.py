"""The alpha-beta communication cost model of ALGORITHM.md, and its fit to measurements.

alpha is the latency of one message, beta the time per byte (values and indices 4 bytes each).
Per worker, one call of:

| method | messages | bytes sent |
| --- | --- | --- |
| dense ring allreduce ("dense") | 2(P-1) | 2(P-1)/P * 4d |
| Top-k via AllGather ("topk") | log2 P | (P-1) * 8k |
| gTop-k, hypercube ("gtopk") | log2 P | log2 P * 8k |

gTop-k for P not a power of two (gtopk_hvd.common.schedule): every rank runs floor(log2 P)
exchanges, but a group with extra ranks holds 3 or 4 ranks, and its ring allgather takes
(members - 1) messages; a rank forwards every block of its group but its right neighbour's.

Time of a call: ``messages * alpha + bytes * beta``.  :func:`fit_alpha_beta` finds the
non-negative (alpha, beta) of least (relative) squared error over measured calls.

Sources: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019, section IV (cost analysis).
"""
import logging
import math
import numbers
import statistics
import time
from dataclasses import dataclass

from gtopk_hvd.common.collective import ring_bytes
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.schedule import stages_for, world_split

__all__ = ["METHODS", "Cost", "Link", "dense_allreduce_cost", "topk_allgather_cost",
           "gtopk_cost", "gtopk_stages", "cost_of", "fit_alpha_beta", "as_link",
           "method_costs", "round_costs", "choose_methods", "buffer_methods", "logged_methods",
           "describe_methods", "node_costs", "measure_link"]

logger = logging.getLogger(__name__)

METHODS = ("dense", "topk", "gtopk")
BYTES_PER_VALUE = 4
BYTES_PER_ENTRY = 8  # float32 value + int32 index


@dataclass(frozen=True)
class Cost:
    """One call on the busiest worker: ``messages`` sent in sequence and ``bytes`` sent."""
    messages: float
    bytes: float

    def time(self, alpha, beta):
        """Seconds under latency ``alpha`` (s per message) and ``beta`` (s per byte)."""
        return self.messages * alpha + self.bytes * beta


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def dense_allreduce_cost(d, size, bytes_per_value=BYTES_PER_VALUE):
    """Ring allreduce of ``d`` values on ``size`` workers: 2(P-1) messages, 2(P-1)/P*4d bytes."""
    d, p = _check_int("d", d, 0), _check_int("size", size, 1)
    return Cost(2 * (p - 1), 2 * (p - 1) / p * bytes_per_value * d)


def topk_allgather_cost(k, size):
    """AllGather of every worker's k (value, index) pairs: log2 P messages, (P-1)*8k bytes."""
    k, p = _check_int("k", k, 0), _check_int("size", size, 1)
    return Cost(math.log2(p), (p - 1) * BYTES_PER_ENTRY * k)


def gtopk_cost(k, size, rank=None):
    """gTop-k's exchanges: log2 P messages of 8k bytes each for P a power of two.

    With ``rank``, that rank's own schedule (:func:`~gtopk_hvd.common.schedule.stages_for`);
    without, the busiest rank (the most messages, then the most bytes).  Each stage is a ring
    allgather in its group: (members - 1) messages, and every block but the right
    neighbour's passes through the rank (headers not counted).
    """
    k, p = _check_int("k", k, 0), _check_int("size", size, 1)
    ranks = range(p) if rank is None else [rank]
    best = Cost(0, 0)
    for r in ranks:
        messages = sent = 0
        for st in stages_for(r, p):
            messages += len(st.group) - 1
            sent += ring_bytes(st.group, r, {m: k if st.sends(m) else 0 for m in st.group},
                               header=False)
        c = Cost(messages, sent)
        if (c.messages, c.bytes) > (best.messages, best.bytes):
            best = c
    return best


def cost_of(method, d, density, size):
    """:class:`Cost` of ``method`` ('dense', 'topk' or 'gtopk') for a buffer of ``d`` values
    at ``density`` (k = :func:`~gtopk_hvd.common.density.k_for`) on ``size`` workers."""
    if method == "dense":
        return dense_allreduce_cost(d, size)
    if method == "topk":
        return topk_allgather_cost(k_for(d, density), size)
    if method == "gtopk":
        return gtopk_cost(k_for(d, density), size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def gtopk_stages(size):
    """Exchanges (Horovod operations) of every rank: floor(log2 P)."""
    return world_split(size)[0]


def fit_alpha_beta(costs, times, relative=True):
    """Least-squares (alpha, beta) >= 0 with ``time ~ messages * alpha + bytes * beta``.

    Args:
        costs: a sequence of :class:`Cost`.
        times: the measured seconds of each.
        relative: minimise the relative error (each equation divided by its time), so that
            small latency-bound calls weigh as much as large bandwidth-bound ones.

    Returns:
        (alpha, beta) in seconds per message and seconds per byte.
    """
    costs, times = list(costs), [float(t) for t in times]
    if len(costs) != len(times):
        raise ValueError(f"got {len(costs)} costs but {len(times)} times")
    if len(costs) < 2:
        raise ValueError(f"fitting alpha and beta needs at least 2 measurements, got {len(costs)}")
    if any(not t > 0 for t in times):
        raise ValueError("every measured time must be > 0 (and not NaN)")
    rows = [(c.messages, c.bytes, t, (1.0 / t if relative else 1.0)) for c, t in zip(costs, times)]

    def sse(a, b):
        return sum(((m * a + n * b) - t) ** 2 * w * w for m, n, t, w in rows)

    # normal equations of the weighted 2-parameter problem
    s_mm = sum((m * w) ** 2 for m, n, t, w in rows)
    s_nn = sum((n * w) ** 2 for m, n, t, w in rows)
    s_mn = sum(m * n * w * w for m, n, t, w in rows)
    s_mt = sum(m * t * w * w for m, n, t, w in rows)
    s_nt = sum(n * t * w * w for m, n, t, w in rows)
    candidates = []
    det = s_mm * s_nn - s_mn * s_mn
    if det > 1e-12 * max(s_mm * s_nn, 1e-300):
        a = (s_mt * s_nn - s_nt * s_mn) / det
        b = (s_nt * s_mm - s_mt * s_mn) / det
        if a >= 0 and b >= 0:
            candidates.append((a, b))
    # the constrained optimum lies on an axis when the free one is not feasible
    if s_mm > 0:
        candidates.append((max(0.0, s_mt / s_mm), 0.0))
    if s_nn > 0:
        candidates.append((0.0, max(0.0, s_nt / s_nn)))
    if not candidates:
        raise ValueError("every cost is zero: nothing to fit")
    alpha, beta = min(candidates, key=lambda ab: sse(*ab))
    logger.debug("alpha-beta fit: alpha=%.3g s, beta=%.3g s/B over %d points", alpha, beta,
                 len(rows))
    return alpha, beta


@dataclass(frozen=True)
class Link:
    """What ``algorithm="auto"`` knows of a job: ``alpha`` (s per message) and ``beta`` (s per
    byte) of its network; ``select`` (s per gradient entry) and ``overhead`` (s per call) of
    the local work a sparsified buffer costs beyond a dense one (compensation, top-k
    selection, residual update; a buffer pays ``overhead`` once and once per stage merge;
    merging costs ``select`` per entry merged); ``stage`` (s): what one gTop-k stage costs
    beyond its bytes, one Horovod operation in a small process set (its negotiation, a
    round trip); 0 when not measured: then alpha per message, as for the dense rounds.
    ``intra_alpha`` / ``intra_beta``: the same as alpha / beta between the ranks of one node
    (hierarchical gTop-k's reduce-scatter and allgather, flat gTop-k's stages inside a
    node); None: the network's (alpha, beta)."""
    alpha: float
    beta: float
    select: float = 0.0
    overhead: float = 0.0
    stage: float = 0.0
    intra_alpha: float = None
    intra_beta: float = None

    def __post_init__(self):
        for name in ("alpha", "beta", "select", "overhead", "stage", "intra_alpha",
                     "intra_beta"):
            if name.startswith("intra") and getattr(self, name) is None:
                continue
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"link {name} must be a finite number >= 0 (seconds), got "
                                 f"{value!r}")


def as_link(link):
    """A :class:`Link` from a Link, a tuple (alpha, beta[, select[, overhead]]), or None."""
    if link is None or isinstance(link, Link):
        return link
    if isinstance(link, (tuple, list)) and len(link) in (2, 3, 4, 5, 6, 7):
        return Link(*link)
    raise ValueError(f"link must be a gtopk_hvd.common.cost.Link or a tuple (alpha_s, "
                     f"beta_s_per_byte[, select_s_per_entry[, overhead_s[, stage_s[, "
                     f"intra_alpha_s, intra_beta_s_per_byte]]]]), got {link!r}")


def method_costs(d, density, size, link):
    """Seconds each method adds to a step for a buffer of ``d`` entries: bytes times beta,
    plus the local work of the sparse methods (``link.select`` per entry of the buffer and
    per entry merged: 2k a stage for gTop-k, kP for Top-k; ``link.overhead`` per call and
    per stage).  The rounds are not in it: a step pays them once for all buffers of a method
    (:func:`round_costs`)."""
    k = k_for(d, density)
    stages = gtopk_stages(size)
    work = link.select * d + link.overhead * (1 + stages)
    return {"dense": dense_allreduce_cost(d, size).bytes * link.beta,
            "gtopk": gtopk_cost(k, size).bytes * link.beta + work
            + link.select * 2 * k * stages,
            "topk": topk_allgather_cost(k, size).bytes * link.beta + work
            + link.select * k * size}


def round_costs(size, link):
    """Seconds of each method's rounds in a step, paid once for all its buffers (they share
    its operations): dense 2(P-1) alpha; gTop-k floor(log2 P) stages of ``link.stage`` each
    plus alpha for every further message of a fold group (without ``stage``: alpha a
    message); Top-k one allgather, ``link.stage`` plus alpha for its further messages."""
    def rounds(messages, operations):
        if link.stage > 0:
            return operations * link.stage + max(0.0, messages - operations) * link.alpha
        return messages * link.alpha
    return {"dense": dense_allreduce_cost(1, size).messages * link.alpha,
            "gtopk": rounds(gtopk_cost(1, size).messages, gtopk_stages(size)),
            "topk": rounds(topk_allgather_cost(1, size).messages, 1)}


def node_costs(d, density, nodes, local, link):
    """On N = ``nodes`` nodes of L = ``local`` ranks (node-contiguous), the seconds one buffer
    of ``d`` entries costs a rank, rounds included, by flat gTop-k ('gtopk') and by
    hierarchical gTop-k ('hierarchical'); the dense ring's, whose one cross-node flow a node
    carries as with one rank a node, is :func:`method_costs`'s.

    Flat gTop-k: a stage whose group lies inside a node runs at the intra-node link; one that
    spans nodes has the node's L ranks sending through its one network card at once (L times
    the bytes at ``beta``).  Hierarchical gTop-k (ALGORITHM.md): the node's alltoall of the
    L shards ((L-1)/L of the buffer at the intra-node link), the selection on the shard, the
    rail's gTop-k on k_l = k of the shard among the N nodes (L rails share the card), the node
    allgather of the L sets; its Horovod operations (alltoall, rail stages, allgather) are
    its own, one step a buffer, at ``link.stage`` each."""
    intra_alpha = link.alpha if link.intra_alpha is None else link.intra_alpha
    intra_beta = link.beta if link.intra_beta is None else link.intra_beta
    size, k = nodes * local, k_for(d, density)
    flat = link.select * d + link.overhead * (1 + gtopk_stages(size))
    for st in stages_for(0, size):
        sent = ring_bytes(st.group, 0, {m: k if st.sends(m) else 0 for m in st.group},
                          header=False)
        crosses = len({m // local for m in st.group}) > 1
        flat += sent * (link.beta * local if crosses else intra_beta) + link.select * 2 * k
        flat += link.stage + (len(st.group) - 2) * link.alpha if link.stage > 0 else \
            (len(st.group) - 1) * (link.alpha if crosses else intra_alpha)
    shard = d // local + (1 if d % local else 0)
    k_l, stages = k_for(shard, density), gtopk_stages(nodes)
    hier = (intra_beta * BYTES_PER_VALUE * shard * (local - 1)  # the node's alltoall
            + link.select * shard * local / 2  # the node sum's additions, about
            + link.select * shard + link.overhead * (1 + stages)
            + link.beta * local * gtopk_cost(k_l, nodes).bytes + link.select * 2 * k_l * stages
            + intra_beta * BYTES_PER_ENTRY * k_l * (local - 1))  # the node's allgather
    operations = 2 + stages
    hier += operations * link.stage if link.stage > 0 else \
        2 * (local - 1) * intra_alpha + gtopk_cost(1, nodes).messages * link.alpha
    return {"gtopk": flat, "hierarchical": hier}


# on a tie the first wins: dense is exact and keeps no residual; gTop-k sends no more than Top-k
_PREFERENCE = ("dense", "gtopk", "topk")


def choose_methods(numels, density, size, link, dense_paid=False, methods=METHODS):
    """The cheapest methods for the buffers (a tuple of 'dense', 'gtopk', 'topk'), the same on
    every rank for the same arguments.

    Three candidates, by their total: every buffer dense, every buffer by its cheapest sparse
    method, and each buffer by its cheapest method (:func:`method_costs`); each method used
    adds its rounds once (:func:`round_costs`), the dense ones unless ``dense_paid`` (tensors
    below dense_threshold are allreduced anyway).  Ties go to the candidate listed first.
    One rank (``size`` 1) sends nothing: every buffer is 'dense' (exact, no residual).
    ``methods``: the candidates ('dense' and at least one sparse method).  Top-k never sends
    fewer bytes than gTop-k by the model ((P - 1) 8k against about log2 P x 8k) and loses
    ties, so it is rarely chosen over gTop-k.
    """
    order = [m for m in _PREFERENCE if m in methods]
    if "dense" not in order or len(order) < 2 or len(order) != len(set(methods)):
        raise ValueError(f"methods must hold 'dense' and 'gtopk' or 'topk' (of {METHODS}), "
                         f"got {methods!r}")
    if size == 1:
        return tuple("dense" for _ in numels)
    costs = [method_costs(d, density, size, link) for d in numels]
    rounds = round_costs(size, link)
    if dense_paid:
        rounds["dense"] = 0.0
    alone = [dict(c) for c in costs]  # a buffer's method with its rounds, as if alone
    for c in alone:
        for m in c:
            c[m] += rounds[m]
    sparse = [min(order[1:], key=lambda m, c=c: (c[m], order.index(m))) for c in alone]
    best = [min(order, key=lambda m, c=c: (c[m], order.index(m))) for c in costs]

    def total(choice):
        return (sum(c[m] for c, m in zip(costs, choice))
                + sum(rounds[m] for m in set(choice)))
    candidates = [tuple("dense" for _ in numels), tuple(sparse), tuple(best)]
    return min(candidates, key=total)


def buffer_methods(algorithm, numels, density, size, link, dense_paid=False, nodes=None):
    """Per buffer, the method a step uses: ``algorithm`` itself ('gtopk' / 'topk'), or with
    ``"auto"`` the cheapest of 'dense' and 'gtopk' by :func:`choose_methods` ('gtopk' for
    every buffer while ``link`` is None on more than one rank: the first step, before the
    link is measured).  ``nodes``: (N, L) where the optimizer may run hierarchical gTop-k:
    then also 'hierarchical' (:func:`hierarchical_choice`).  The same on every rank for the
    same arguments."""
    if algorithm != "auto":
        return tuple(algorithm for _ in numels)
    if link is None and size > 1:
        return tuple("gtopk" for _ in numels)
    methods = choose_methods(numels, density, size, link, dense_paid=dense_paid,
                             methods=("dense", "gtopk"))
    if nodes is None or "gtopk" not in methods:
        return methods
    return hierarchical_choice(numels, density, nodes, link, methods)


def hierarchical_choice(numels, density, nodes, link, methods):
    """``methods`` (dense or gTop-k per buffer, :func:`choose_methods`), with 'hierarchical'
    for every sparsified buffer where that step costs less than flat gTop-k on these
    ``nodes`` (N, L) by :func:`node_costs` (a step runs one mode: all its sparsified buffers
    flat, or all hierarchical)."""
    sparse = [d for d, m in zip(numels, methods) if m == "gtopk"]
    costs = [node_costs(d, density, *nodes, link) for d in sparse]
    flat = sum(c["gtopk"] for c in costs)
    if sum(c["hierarchical"] for c in costs) < flat:
        return tuple("hierarchical" if m == "gtopk" else m for m in methods)
    return methods


def logged_methods(algorithm, numels, density, size, link, dense_paid, rank, said, nodes=None):
    """:func:`buffer_methods` as a state chooses them for a step: logged (INFO on rank 0)
    whenever what ``algorithm="auto"`` chose with a link changes.  ``said``: the description
    logged last (None at first).  Returns (methods, the description now)."""
    methods = buffer_methods(algorithm, numels, density, size, link, dense_paid=dense_paid,
                             nodes=nodes)
    if algorithm == "auto" and link is not None:
        now = describe_methods(methods)
        if now != said:
            logger.log(logging.INFO if rank == 0 else logging.DEBUG,
                       "gtopk_hvd: algorithm='auto' at density %g on %d ranks (%s): %s",
                       density, size, link, now)
        said = now
    return methods, said


def describe_methods(methods):
    """'2 buffer(s) by dense, 1 buffer(s) by gtopk': what ``algorithm="auto"`` chose, for the
    log."""
    counts = {m: list(methods).count(m) for m in sorted(set(methods))}
    return ", ".join(f"{n} buffer(s) by {m}" for m, n in counts.items())


def measure_link(allreduce, select, agree, size, n=1 << 18, repeats=5, clock=time.perf_counter,
                 stage=None, intra=None, local=1):
    """Measure a :class:`Link` on the running job, in tens of milliseconds; call it on every
    rank at the same point: it issues the same Horovod operations everywhere.

    Args:
        allreduce: ``allreduce(numel)`` runs one dense allreduce of ``numel`` float32 values
            on every rank (a collective) and returns when it is done.
        select: ``select(numel)`` runs, locally, the work gTop-k adds on a buffer of
            ``numel`` entries (compensate, select the top-k, update the residual).
        agree: ``agree(values)`` returns the element-wise maximum over the ranks (one
            allreduce), so that every rank derives the same Link, hence the same choices.
        size: the number of ranks; n: entries of the large probe; repeats: medians of this
            many runs; clock: seconds now.
        stage: ``stage()`` runs one gTop-k stage of one entry (an allgather in this rank's
            first exchange group, a collective); None: ``Link.stage`` stays 0.
        intra: ``intra(numel)`` runs a dense allreduce inside this rank's node of ``local``
            ranks (hierarchical gTop-k; the same on every rank): ``Link.intra_alpha`` and
            ``intra_beta`` from it; None: they stay None (the network's).

    Two allreduce sizes (1 and ``n`` entries) fit alpha and beta to the dense ring's cost
    (:func:`dense_allreduce_cost`); ``select`` on 64 entries gives the fixed cost of a buffer
    (``overhead``), on ``n`` entries the cost per entry beyond it; ``stage`` the cost of a
    gTop-k stage's operation (Horovod's negotiation and a round trip), which the dense
    probes cannot tell from the ring's 2(P-1) messages.
    """
    def median_time(fn, *args):
        times = []
        for _ in range(repeats):
            start = clock()
            fn(*args)
            times.append(clock() - start)
        return statistics.median(times)

    allreduce(1)  # warm-up: the first operation of a name negotiates longer
    select(n)
    small = median_time(allreduce, 1)
    large = median_time(allreduce, n)
    one_stage = 0.0
    if stage is not None and size > 1:
        stage()
        one_stage = median_time(stage)
    node_small = node_large = 0.0
    if intra is not None and local > 1:
        intra(1)
        node_small, node_large = median_time(intra, 1), median_time(intra, n)
    overhead = median_time(select, _SMALL)
    per_entry = max(0.0, median_time(select, n) - overhead) / n
    small, large, per_entry, overhead, one_stage, node_small, node_large = agree(
        [small, large, per_entry, overhead, one_stage, node_small, node_large])
    if size == 1:
        return Link(0.0, 0.0, per_entry, overhead)
    alpha, beta = fit_alpha_beta([dense_allreduce_cost(1, size), dense_allreduce_cost(n, size)],
                                 [max(small, 1e-9), max(large, 1e-9)])
    intra_alpha = intra_beta = None
    if intra is not None and local > 1:
        intra_alpha, intra_beta = fit_alpha_beta(
            [dense_allreduce_cost(1, local), dense_allreduce_cost(n, local)],
            [max(node_small, 1e-9), max(node_large, 1e-9)])
    return Link(alpha, beta, per_entry, overhead, one_stage, intra_alpha, intra_beta)


_SMALL = 64  # entries of the probe that times a sparse buffer's fixed cost
