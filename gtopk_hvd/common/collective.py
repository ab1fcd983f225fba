"""The gTop-k collective, written once over a small set of tensor operations.

The torch and tensorflow adapters provide the operations (:class:`TensorOps`); this module
runs the schedule of ALGORITHM.md with them on one rank:

1. local select: I = exact top-k of |acc| (ties by lower index), S = (acc[I], I);
2. for each stage of :func:`gtopk_hvd.common.schedule.stages_for`:
   - fold: an extra rank sends S to rank - P'; that rank merges it into its own S (its own set
     first), keeps k, and from then on tracks the extra rank's alive flags too;
   - hypercube stage s: swap S with rank ^ 2^s, merge in canonical order (lower rank first),
     keep k; alive &= (I in S);
   - unfold: the base rank sends the final S to the extra rank, the indices of the extra rank's
     surviving entries encoded as -(i + 1); the extra rank decodes them into its alive flags;
3. return the final S (identical on every rank) and the alive flags over I: the caller zeroes
   the residual at I[alive] (entries that were sent but died go back into the residual).

Each exchange is one Horovod allgather in the pair's process set of an (n, 2) int32 tensor:
float32 values bit-cast to int32 in column 0, int32 indices in column 1, so a stage moves
8k bytes each way, as in the paper's cost model.  A side that only receives sends 0 rows.
"""
import logging
import time

from gtopk_hvd.common.schedule import FOLD, HYPERCUBE, UNFOLD, stages_for

__all__ = ["TensorOps", "gtopk_exchange", "topk_allgather_exchange", "ExchangeResult",
           "GTopkResult", "reduce_op_name", "dense_allreduce_bytes"]

logger = logging.getLogger(__name__)


class TensorOps:
    """What a framework adapter provides.  Index tensors are int32; value tensors float32.

    select_topk(acc, k): sorted-ascending indices of the k largest |acc|, ties by lower index.
    take(x, indices): x[indices].
    exchange(values, indices, process_set, name): allgather (values, indices) inside
        ``process_set``; returns (values, indices) of all members concatenated in rank order.
    merge_truncate(low, high, k): union of two (values, indices) sets, values added (low + high)
        where an index is in both, then the k largest |value| (ties by lower index), sorted by
        index.
    isin(a, b): bool mask over a, True where a's element is in b.
    logical_and(a, b), mask_select(x, mask), full_mask(k): bool helpers.
    encode_flags(indices, flags): where(flags, -indices - 1, indices).
    decode_flags(indices): (decoded indices, flags).
    empty(): a (values, indices) pair with no entries.
    """


class ExchangeResult:
    """values / indices: the global set (sorted by index), identical on every rank.
    local_indices / alive: this rank's local top-k and which of it survived.
    bytes_sent: bytes this rank put on the wire.  timings: seconds per phase (eager only).
    """

    def __init__(self, values, indices, local_indices, alive, bytes_sent, timings):
        self.values = values
        self.indices = indices
        self.local_indices = local_indices
        self.alive = alive
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


def gtopk_exchange(ops, acc, k, rank, size, process_set_for, name="gtopk", profile=False,
                   sync=None):
    """Run gTop-k on this rank's compensated gradient ``acc`` (1-D float32).

    Args:
        ops: the adapter's :class:`TensorOps`.
        acc: this rank's acc = G + eps, 1-D float32.
        k: entries kept (``k_for(acc.numel, density)``), 1 <= k <= acc size.
        rank, size: this rank and the world size.
        process_set_for: maps a :class:`~gtopk_hvd.common.schedule.Stage` to its process set.
        name: a prefix for the Horovod op names.
        profile: record per-phase wall times ('selection', 'exchange', 'merge') in eager mode.
        sync: with ``profile``, a function that waits for a tensor (for asynchronous devices).

    Returns:
        :class:`ExchangeResult`.
    """
    timer = _Timer(profile, sync)
    local = ops.select_topk(acc, k)
    values, indices = ops.take(acc, local), local
    timer.lap("selection", values)
    alive = ops.full_mask(k)
    extra_local = extra_alive = None
    sent = 0
    for st in stages_for(rank, size):
        ps = process_set_for(st)
        tag = f"{name}.{st.kind}{st.index if st.kind == HYPERCUBE else ''}"
        if st.kind == FOLD and st.sends:
            # extra rank: hand our set to rank - P' and wait for the unfold
            ops.exchange(values, indices, ps, tag)
            sent += k
            timer.lap("exchange")
        elif st.kind == FOLD:
            e_values, e_indices = ops.exchange(*ops.empty(), ps, tag)
            timer.lap("exchange", e_values)
            values, indices = ops.merge_truncate((values, indices), (e_values, e_indices), k)
            alive = ops.logical_and(alive, ops.isin(local, indices))
            extra_local, extra_alive = e_indices, ops.isin(e_indices, indices)
            timer.lap("merge", values)
        elif st.kind == HYPERCUBE:
            # stage s: swap with partner rank ^ (1 << s); the gathered rows are in rank order
            all_values, all_indices = ops.exchange(values, indices, ps, tag)
            sent += k
            timer.lap("exchange", all_values)
            values, indices = ops.merge_truncate((all_values[:k], all_indices[:k]),
                                                 (all_values[k:], all_indices[k:]), k)
            alive = ops.logical_and(alive, ops.isin(local, indices))
            if extra_local is not None:
                extra_alive = ops.logical_and(extra_alive, ops.isin(extra_local, indices))
            timer.lap("merge", values)
        elif st.kind == UNFOLD and st.sends:
            flags = ops.isin(indices, ops.mask_select(extra_local, extra_alive))
            ops.exchange(values, ops.encode_flags(indices, flags), ps, tag)
            sent += k
            timer.lap("exchange")
        elif st.kind == UNFOLD:
            values, coded = ops.exchange(*ops.empty(), ps, tag)
            timer.lap("exchange", values)
            indices, flags = ops.decode_flags(coded)
            alive = ops.isin(local, ops.mask_select(indices, flags))
            timer.lap("merge", values)
    return ExchangeResult(values, indices, local, alive, sent * BYTES_PER_ENTRY, timer.timings)


def topk_allgather_exchange(ops, acc, k, global_set, size, name="topk", profile=False, sync=None):
    """Top-k S-SGD: gather every rank's local top-k from all ranks (O(kP)) and sum them.

    Returns an :class:`ExchangeResult` whose (values, indices) hold all P*k gathered entries
    in rank order (indices may repeat: the caller scatter-adds them); every local entry is alive.
    """
    timer = _Timer(profile, sync)
    local = ops.select_topk(acc, k)
    values = ops.take(acc, local)
    timer.lap("selection", values)
    all_values, all_indices = ops.exchange(values, local, global_set, name)
    timer.lap("exchange", all_values)
    # a ring allgather forwards the other ranks' sets too: (P - 1) k entries leave each rank
    return ExchangeResult(all_values, all_indices, local, ops.full_mask(k),
                          (size - 1) * k * BYTES_PER_ENTRY, timer.timings)
