"""The gTop-k collective, written once over a small set of tensor operations.

The torch and tensorflow adapters provide the operations (:class:`TensorOps`); this module
runs the schedule of ALGORITHM.md with them on one rank:

1. local select: I = exact top-k of |acc| (ties by lower index), S = (acc[I], I);
2. for each stage of :func:`gtopk_hvd.common.schedule.stages_for` (the same number on every
   rank): allgather in the stage's group; in a fold stage (stage 0 with extra ranks) first
   merge each virtual rank's set with its mirror's, then merge the two virtual ranks' sets in
   canonical order (lower first), keep k; alive &= (I in S) after every merge this rank's
   virtual rank took part in;
3. return the final S (identical on every rank), the alive flags over I (the caller zeroes
   the residual at I[alive]: entries that were sent but died go back into the residual) and
   the step's verdict.

Each message is an (n + 1, 2) int32 tensor: a header row (n, meta), then n rows of float32
values bit-cast to int32 next to int32 indices, so a stage moves 8k bytes (+ 8) each way.
``meta`` carries the sender's flags and its plan digest (:func:`make_meta`): every receiver
ORs the flags into its own and raises the MISMATCH flag when a digest differs from its own.
The flags travel on through the later stages, so after the last stage every rank holds the
same verdict (non-finite input somewhere, set-ups that disagree) at no extra round trip.
"""
import logging
import time

from gtopk_hvd.common.schedule import stages_for, virtual_rank

__all__ = ["TensorOps", "gtopk_exchange", "gtopk_exchange_steps", "drive",
           "gtopk_exchange_grouped", "topk_allgather_exchange",
           "ExchangeResult", "GTopkResult", "reduce_op_name", "dense_allreduce_bytes", "NONFINITE",
           "MISMATCH", "JOINED", "ALL_FLAGS", "FLAG_BITS", "DIGEST_BITS",
           "make_meta", "merge_meta", "ring_bytes", "gtopk_wire_bytes", "topk_wire_bytes",
           "message_bytes", "VERDICT_TAIL", "verdict_tail", "tail_verdict",
           "allreduce_with_verdict"]

logger = logging.getLogger(__name__)

NONFINITE = 1  # some rank's acc held NaN or Inf
MISMATCH = 2   # some rank's plan digest differed from its partner's
JOINED = 4     # every rank heard from has joined (hvd.join(): zeros, no plan of its own)
ALL_FLAGS = NONFINITE | MISMATCH | JOINED
FLAG_BITS = 3
DIGEST_BITS = 32 - FLAG_BITS
_DIGEST_MASK = (1 << DIGEST_BITS) - 1


def make_meta(digest, flags=0):
    """A header's meta field: a 29-bit ``digest`` and the flags, as a signed int32 value."""
    meta = ((int(digest) & _DIGEST_MASK) << FLAG_BITS) | int(flags)
    return meta - (1 << 32) if meta >= 1 << 31 else meta


def merge_meta(mine, theirs):
    """``mine`` with the flags of ``theirs`` ORed in, and MISMATCH if the digests differ
    (plain integers; the adapters do the same with tensor operations).

    JOINED is kept only when both sides carry it: a meta that carries it stands for ranks
    that all joined (``hvd.join()``), which contribute zeros and have no plan to compare, so
    its digest is not compared, and a joined side takes the other side's digest."""
    mine_joined, theirs_joined = mine & JOINED, theirs & JOINED
    flags = (mine | theirs) & (NONFINITE | MISMATCH)
    if not (mine_joined or theirs_joined) and (mine >> FLAG_BITS) != (theirs >> FLAG_BITS):
        flags |= MISMATCH
    flags |= mine_joined & theirs_joined
    base = theirs if mine_joined and not theirs_joined else mine
    return (base & ~ALL_FLAGS) | flags


VERDICT_TAIL = DIGEST_BITS + 2  # entries: the digest's bits, then NONFINITE, then JOINED


def verdict_tail(digest, flags=0):
    """Entries (0.0 or 1.0) to append to a dense allreduce so that it carries the verdict of
    the gTop-k headers: the bits of the 29-bit plan ``digest`` (all 0 on a joined rank,
    which has no plan to compare), whether this rank's gradients are not finite, whether it
    joined.  Read back with :func:`tail_verdict`."""
    joined = bool(flags & JOINED)
    digest = 0 if joined else int(digest) & _DIGEST_MASK
    return [float((digest >> b) & 1) for b in range(DIGEST_BITS)] + \
        [1.0 if flags & NONFINITE else 0.0, 1.0 if joined else 0.0]


def tail_verdict(reduced, size, average):
    """The verdict (NONFINITE | MISMATCH | JOINED flags, as after a gTop-k exchange) from the
    reduced tail of :func:`verdict_tail` (a sequence of ``VERDICT_TAIL`` floats, averaged
    over ``size`` ranks if ``average`` else summed).

    Each entry becomes the fraction q of ranks that sent 1; a = 1 - q(JOINED) is the
    fraction of ranks that did not join.  A digest bit on which those ranks agree has q = 0
    or q = a; otherwise q lies at least 1/P away from both, so the tests with a margin of
    1/(2P) are safe against the rounding of the average (and of float16)."""
    if len(reduced) != VERDICT_TAIL:
        raise ValueError(f"expected {VERDICT_TAIL} tail entries, got {len(reduced)}")
    fractions = [float(v) if average else float(v) / size for v in reduced]
    margin = 1.0 / (2 * size)
    verdict = NONFINITE if not fractions[-2] < margin else 0  # NaN counts as not finite
    active = 1.0 - fractions[-1]
    if active < margin:
        verdict |= JOINED
    if any(not (q < margin or abs(q - active) < margin) for q in fractions[:-2]):
        verdict |= MISMATCH
    return verdict


def allreduce_with_verdict(allreduce, digest, flags, size, average, refused):
    """(flat, verdict) of a dense allreduce that carries the verdict of the gTop-k headers.

    ``allreduce(tail)`` reduces the dense parts with ``tail`` (the floats of
    :func:`verdict_tail`) appended and returns (flat, the reduced tail as a list of floats).
    Ranks whose dense parts differ in size make Horovod refuse the allreduce on every rank
    with an error naming "Mismatched" shapes (one of the exception types ``refused``): that
    is a MISMATCH, as the headers would have found; flat is then None.  ``average``: the
    allreduce averages (else it sums)."""
    try:
        flat, tail = allreduce(verdict_tail(digest, flags))
    except refused as error:
        if "Mismatched" not in str(error):
            raise
        return None, MISMATCH
    return flat, tail_verdict(tail, size, average)


class TensorOps:
    """What a framework adapter provides.  Index tensors are int32; value tensors float32;
    ``meta`` an int32 scalar (tensor).

    select_topk(acc, k): sorted-ascending indices of the k largest |acc|, ties by lower index.
    select_topk_many(accs, ks): [select_topk(acc, k) for each buffer], the same indices (an
        adapter may select small buffers together).
    take(x, indices): x[indices].
    meta(digest, flags): this rank's header meta, as :func:`make_meta`.
    take_none(values, indices): the empty set a header-only message carries.
    pack(values, indices, meta, wire): the int32 message, header (n, meta) first: with wire
        "float32" an (n + 1, 2) array of rows (value bits, index); with "float16" a 1-D array
        (n, meta, the n indices, the n float16 values two to an int32, padded to even).
    allgather(message, process_set, name): Horovod's allgather inside ``process_set``.
    unpack(gathered, members, wire): the ``members`` messages of an allgather, in rank
        order, as a list of (values, indices, meta) with float32 values, read header by
        header.
    round_to_wire(values, wire): the float32 values a message of ``wire`` carries (float16:
        rounded to nearest, to +-inf beyond 65504).
    or_nonfinite(flags, values): ``flags`` with NONFINITE added when ``values`` holds NaN or
        Inf (a float16 wire's overflow).
    holds(values, n): whether a set has exactly ``n`` entries (a bool, or a bool tensor in
        a graph).
    choose(ok, theirs, mine): ``theirs`` (a tuple of tensors) where ``ok``, else ``mine``
        (they may differ in length: in a graph a conditional).
    split_set(values, indices, ks): a set laid end to end (concat_sets) cut back into pieces
        of ks[0], ks[1], ... entries.
    merge_meta(mine, theirs): as :func:`merge_meta`.  flags_of(meta): its flag bits.
    concat_sets(sets): the (values, indices) of several sets laid end to end.
    merge_truncate(low, high, k): union of two (values, indices) sets, values added (low + high)
        where an index is in both, then the k largest |value| (ties by lower index), sorted by
        index.
    merge_truncate_many(lows, highs, ks): [merge_truncate(lows[b], highs[b], ks[b]) for each
        b], the same results (an adapter may do them together).
    isin_many(as_, bs): [bool mask over as_[b], True where its element is in bs[b]] for each
        buffer b; every bs[b] is sorted ascending (a merge's indices).
    logical_and(a, b), full_mask(k): bool helpers.
    add_flag(flags, flag): ``flags`` with the bit ``flag`` set (an int, or an int32 tensor).
    length(values): the entries of a 1-D tensor (an int, or an int32 tensor in a graph where
        the length is only known at run time).
    with_length(x, n): ``x``, known to hold ``n`` entries (in a graph: with that static
        shape).
    """


class ExchangeResult:
    """values / indices: the global set (sorted by index), identical on every rank.
    local_indices / alive: this rank's local top-k and which of it survived.
    local_values: this rank's local top-k values as they went on the wire (float16 wire:
    rounded; what the rounding took off stays in the residual).
    verdict: the flags every rank agrees on after the exchange (NONFINITE, MISMATCH, JOINED),
    an int32
    scalar of the adapter.  bytes_sent: bytes this rank put on the wire (ring allgather).
    timings: seconds per phase (eager only).
    """

    def __init__(self, values, indices, local_indices, alive, verdict, bytes_sent, timings,
                 local_values=None, wire="float32"):
        self.values = values
        self.local_values = local_values
        self.wire = wire
        self.indices = indices
        self.local_indices = local_indices
        self.alive = alive
        self.verdict = verdict
        self.bytes_sent = bytes_sent
        self.timings = timings


BYTES_PER_ENTRY = 8  # float32 value + int32 index

_REDUCE_OPS = ("Average", "Sum", "Adasum", "Min", "Max", "Product")


class GTopkResult:
    """What one ``gtopk_allreduce`` of either backend returns.

    output: the dense result (average or sum over ranks), shape and dtype of the input,
        bit-identical on every rank.
    residual: this rank's new residual, flat float32 (keep it for the next call); with
        PyTorch, the tensor passed as ``residual``, updated in place, when one was passed.
    values / indices: the global set (float32 sums / int32 indices).  With
        ``algorithm="topk"`` all P*k gathered entries in rank order (indices may repeat).
    local_indices / alive: this rank's local top-k and which of it made it into the result.
    k: entries selected per rank.  bytes_sent: bytes this rank put on the wire.
    finite: False when some rank's input was not finite (NaN or Inf): then ``output`` is NaN
        everywhere on every rank and the residual is what was passed in (a bool, or a bool
        tensor in a ``tf.function``).
    timings: seconds per phase ('selection', 'exchange', 'merge', 'decompress', 'residual')
        when called (eagerly) with ``profile=True``, else empty.
    """

    def __init__(self, output, residual, exchange_result, k):
        self.output = output
        self.residual = residual
        self.values = exchange_result.values
        self.indices = exchange_result.indices
        self.local_indices = exchange_result.local_indices
        self.alive = exchange_result.alive
        self.k = k
        self.bytes_sent = exchange_result.bytes_sent
        self.finite = True
        self.timings = dict(exchange_result.timings)

    def __repr__(self):
        return f"GTopkResult(k={self.k}, bytes_sent={self.bytes_sent})"


def reduce_op_name(hvd, op):
    """The name of Horovod reduce op ``op`` ('Average', 'Sum', ...) of module ``hvd``
    (``horovod.torch`` or ``horovod.tensorflow``), or its repr if unknown."""
    for name in _REDUCE_OPS:
        try:
            if op == getattr(hvd, name):
                return name
        except (AttributeError, TypeError, ValueError):  # missing op, odd objects
            continue
    return repr(op)


def dense_allreduce_bytes(numel, size):
    """Bytes one rank sends in a ring allreduce of ``numel`` float32: 2(P-1)/P * 4 * numel."""
    return 2 * (size - 1) * 4 * numel // size


class _Timer:
    def __init__(self, enabled, sync):
        self.enabled, self.sync, self.timings = enabled, sync, {}
        self._t = time.perf_counter() if enabled else 0.0

    def lap(self, phase, tensor=None):
        if self.enabled:
            if self.sync is not None and tensor is not None:
                self.sync(tensor)
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self._t
            self._t = now


def message_bytes(entries, wire="float32", header=True):
    """Bytes of one message of ``entries`` entries: an 8-byte header (unless not
    ``header``), then 8 bytes per entry (float32 wire) or 6 (float16: the values two to an
    int32, padded to even)."""
    head = 8 if header else 0
    if wire == "float16":
        return head + 4 * entries + 4 * ((entries + 1) // 2)
    return head + BYTES_PER_ENTRY * entries


def ring_bytes(group, rank, rows, wire="float32", header=True):
    """Bytes ``rank`` sends in a ring allgather (gloo's) of ``group`` whose members send
    messages of ``rows[member]`` entries: every block but its right neighbour's passes
    through it."""
    right = group[(group.index(rank) + 1) % len(group)]
    return sum(message_bytes(rows[m], wire, header) for m in group if m != right)


def gtopk_wire_bytes(k, rank, size, wire="float32"):
    """Bytes ``rank`` sends in one gTop-k exchange with ``k`` entries per set: a header and k
    entries per sending member of each stage's group, through a ring allgather."""
    return sum(ring_bytes(st.group, rank, {m: k if st.sends(m) else 0 for m in st.group}, wire)
               for st in stages_for(rank, size))


def topk_wire_bytes(k, size, wire="float32"):
    """Bytes one rank sends in a Top-k allgather of ``k`` entries (+ header) per rank."""
    return (size - 1) * message_bytes(k, wire)


def gtopk_exchange(ops, acc, k, rank, size, process_set_for, name="gtopk", digest=0,
                   flags=0, profile=False, sync=None, wire="float32"):
    """Run gTop-k on this rank's compensated gradient ``acc`` (1-D float32).

    Args:
        ops: the adapter's :class:`TensorOps`.
        acc: this rank's acc = G + eps, 1-D float32.
        k: entries kept (``k_for(acc.numel, density)``), 1 <= k <= acc size.
        rank, size: this rank and the world size.
        process_set_for: maps a :class:`~gtopk_hvd.common.schedule.Stage` to its process set.
        name: a prefix for the Horovod op names (stage s is ``{name}.s{s}``).
        digest: this rank's plan digest (every rank must hold the same one).
        flags: this rank's flags (NONFINITE when its acc is not finite), int or int32 scalar.
        profile: record per-phase wall times ('selection', 'exchange', 'merge') in eager mode.
        sync: with ``profile``, a function that waits for a tensor (for asynchronous devices).
        wire: how values travel, "float32" or "float16" (every merge reads the values as they
            travelled, also its own, so every rank still computes the same sums in float32).

    Returns:
        :class:`ExchangeResult`.
    """
    return gtopk_exchange_grouped(ops, [acc], [k], rank, size, process_set_for, name, digest,
                                  flags, profile, sync, wire)[0]


def drive(steps, allgather):
    """Run an exchange generator (:func:`gtopk_exchange_steps`) to its end, each request with
    ``allgather(message, process_set, name)``; its result."""
    try:
        request = next(steps)
        while True:
            request = steps.send(allgather(*request))
    except StopIteration as done:
        return done.value


def gtopk_exchange_grouped(ops, accs, ks, rank, size, process_set_for, name="gtopk", digest=0,
                           flags=0, profile=False, sync=None, wire="float32"):
    """gTop-k on several buffers at once, one allgather per stage for all of them: the
    requests of :func:`gtopk_exchange_steps` issued with ``ops.allgather``.  Returns one
    :class:`ExchangeResult` per buffer (with the same verdict)."""
    return drive(gtopk_exchange_steps(ops, accs, ks, rank, size, process_set_for, name, digest,
                                      flags, _Timer(profile, sync), wire), ops.allgather)


def gtopk_exchange_steps(ops, accs, ks, rank, size, process_set_for, name="gtopk", digest=0,
                         flags=0, timer=None, wire="float32"):
    """The stage loop of gTop-k (ALGORITHM.md, step 3) for one or more buffers, one stage at a
    time: a generator that selects, then yields one request per stage, a tuple
    (message, process_set, op name ``{name}.s<stage>``) for Horovod's allgather, takes the
    gathered tensor back (``send``) and merges; its return value (``StopIteration.value``) is
    one :class:`ExchangeResult` per buffer.  The same requests, in the same order, on every
    rank; a caller may overlap the stages with other work (gtopk_hvd.torch.buckets).

    Each buffer runs exactly the schedule of ALGORITHM.md (same sets, same merges, same
    results); at every stage a sending rank's sets of all buffers travel end to end in one
    message with one header, so a step of L buffers costs log2 P latency rounds instead of
    L x log2 P.  Every set a rank sends has exactly k_b entries (a local top-k, or a merge
    truncated to k_b), so the receiver splits the message by its own ``ks``; a sender whose
    entry count differs (set-ups that disagree) raises the MISMATCH flag and its message is
    not read.  One verdict for all buffers.
    """
    timer = timer or _Timer(False, None)
    n, total = len(accs), (ks[0] if len(ks) == 1 else sum(ks))
    # 1. local select: this rank's top-k of every buffer, as it goes on the wire
    local = ops.select_topk_many(accs, ks) if n > 1 else [ops.select_topk(accs[0], ks[0])]
    values = [ops.round_to_wire(ops.take(acc, chosen), wire) for acc, chosen in zip(accs, local)]
    if wire == "float16":  # beyond float16's range: a non-finite step for every rank
        for vals in values:
            flags = ops.or_nonfinite(flags, vals)
    local_values, indices = list(values), list(local)
    alive = [ops.full_mask(k) for k in ks]
    timer.lap("selection", values[-1])
    meta = ops.meta(digest, flags)
    v = virtual_rank(rank, size)
    for st in stages_for(rank, size):
        # stage s: swap sets inside the stage's group (a pair, or the fold's three ranks)
        mine = ops.concat_sets(list(zip(values, indices))) if n > 1 else (values[0], indices[0])
        sent = mine if st.sends(rank) else ops.take_none(*mine)
        gathered = yield ops.pack(*sent, meta, wire), process_set_for(st), f"{name}.s{st.index}"
        timer.lap("exchange", gathered)
        blocks = dict(zip(st.group, ops.unpack(gathered, len(st.group), wire)))
        for member, (their_values, their_indices, their_meta) in blocks.items():
            if member == rank:
                continue
            meta = ops.merge_meta(meta, their_meta)
            if st.sends(member) and n > 1:  # another entry count cannot be split: flag it
                mismatch = ops.merge_meta(meta, ops.meta(digest + 1, MISMATCH))
                *block, meta = ops.choose(ops.holds(their_values, total),
                                          (their_values, their_indices, their_meta, meta),
                                          (*mine, their_meta, mismatch))
                blocks[member] = tuple(block)
        split = {m: (ops.split_set(b[0], b[1], ks) if n > 1 else [b[:2]])
                 for m, b in blocks.items() if st.sends(m)}
        values, indices, alive = _merge_stage(ops, st, split, alive, local, ks, v, size)
        timer.lap("merge", values[-1])
    verdict, sent_bytes = ops.flags_of(meta), gtopk_wire_bytes(total, rank, size, wire)
    # the group's bytes are counted once, on the first buffer
    return [ExchangeResult(values[b], indices[b], local[b], alive[b], verdict,
                           sent_bytes if b == 0 else 0, timer.timings, local_values[b], wire)
            for b in range(n)]


def _merge_stage(ops, st, sets, alive, local, ks, v, size):
    """The merges of stage ``st`` for every buffer of an exchange, each merge done for all
    buffers at once (``ops.merge_truncate_many``): the fold first (a virtual rank's sets with
    its mirror's), then the lower virtual rank's sets with the higher one's, keeping k_b;
    alive &= (I in S) after every merge this rank's virtual rank took part in.
    ``sets`` {sending member: [(values, indices) per buffer]}, ``alive`` / ``local`` per
    buffer.  Returns (values, indices, alive), lists over the buffers."""
    merged_sets = {}
    for x in (st.low, st.high):
        members = [m for m in st.group if virtual_rank(m, size) == x and st.sends(m)]
        merged = sets[members[0]]
        if len(members) > 1:  # fold: the virtual rank's sets merged with its mirror's
            merged = ops.merge_truncate_many(merged, sets[members[1]], ks)
            if x == v:
                alive = [ops.logical_and(a, found) for a, found in
                         zip(alive, ops.isin_many(local, [m[1] for m in merged]))]
        merged_sets[x] = merged
    merged = ops.merge_truncate_many(merged_sets[st.low], merged_sets[st.high], ks)
    values, indices = [m[0] for m in merged], [m[1] for m in merged]
    alive = [ops.logical_and(a, found) for a, found in zip(alive, ops.isin_many(local, indices))]
    return values, indices, alive


def topk_allgather_exchange(ops, acc, k, global_set, size, name="topk", digest=0, flags=0,
                            profile=False, sync=None, wire="float32"):
    """Top-k S-SGD: gather every rank's local top-k from all ranks (O(kP)) and sum them.

    Returns an :class:`ExchangeResult` whose (values, indices) hold all P*k gathered entries
    in rank order (indices may repeat: the caller scatter-adds them); every local entry is
    alive.  The headers give every rank every other rank's flags and digest.
    """
    timer = _Timer(profile, sync)
    local = ops.select_topk(acc, k)
    values = ops.round_to_wire(ops.take(acc, local), wire)
    if wire == "float16":
        flags = ops.or_nonfinite(flags, values)
    timer.lap("selection", values)
    meta = ops.meta(digest, flags)
    gathered = ops.allgather(ops.pack(values, local, meta, wire), global_set, name)
    timer.lap("exchange", gathered)
    blocks = ops.unpack(gathered, size, wire)
    for _, _, their_meta in blocks:
        meta = ops.merge_meta(meta, their_meta)
    all_values, all_indices = ops.concat_sets([b[:2] for b in blocks])
    return ExchangeResult(all_values, all_indices, local, ops.full_mask(k), ops.flags_of(meta),
                          topk_wire_bytes(k, size, wire), timer.timings, values, wire)
