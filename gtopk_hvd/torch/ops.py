"""PyTorch tensor operations for the framework-free gTop-k driver (gtopk_hvd.common.collective).

:class:`TorchOps` implements the :class:`~gtopk_hvd.common.collective.TensorOps` protocol with
int32 indices and float32 values.  Two operations carry the algorithm's exactness:

- :func:`select_topk`: the exact top-k of |acc|, ties broken by lower index, as
  :func:`gtopk_hvd.common.reference.select_topk`.  On a 25M-element gradient a full sort or
  ``torch.topk`` takes tens of times one pass over the data, so the selection first narrows
  the search with a threshold estimated from a deterministic strided sample and per-block
  maxima, then selects exactly among the (about 2k) candidates;
- :func:`merge_truncate`: the union of two sparse sets with values added low + high in float32,
  then the k largest magnitudes (ties by lower index), the same arithmetic as the reference's
  ``truncate(merge(low, high), k)``, so partners and the reference agree bit for bit.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
import math
import time

import torch

from gtopk_hvd.common.collective import ALL_FLAGS, NONFINITE, make_meta, merge_meta
from gtopk_hvd.common.threads import host_cores, sleeps, waits_politely

__all__ = ["TorchOps", "select_topk", "merge_truncate", "all_finite", "wait"]

logger = logging.getLogger(__name__)

_SAMPLE_SIZE = 1 << 16   # strided sample that estimates the selection threshold
_OVERSAMPLE = 2.0        # aim for about 2k candidates, so the estimate rarely falls short
_TIE_CHUNK = 1 << 20     # chunk of the scan for the first entries equal to the threshold
_BLOCK = 64              # the candidate scan reads per-block max / min, not every entry


def _topk_positions(absval, k):
    """Ascending positions of the k largest ``absval``, ties by lower position.

    The k-th largest value splits the entries: all above it are in, and the lowest positions
    equal to it fill up to k (linear time, no sort).  NaN ranks below every number, then by
    position, as in the NumPy reference.
    """
    if absval.numel() <= k:
        return torch.arange(absval.numel(), device=absval.device)
    key = torch.nan_to_num(absval, nan=-1.0)
    kth = torch.topk(key, k, sorted=False).values.min()
    chosen = key > kth
    need = k - int(chosen.sum())
    chosen[torch.nonzero(key == kth).flatten()[:need]] = True
    return torch.nonzero(chosen).flatten()


def _first_equal(acc, thr, need):
    """Ascending positions of the first ``need`` entries with |acc| == thr (fewer if absent)."""
    found = []
    for start in range(0, acc.numel(), _TIE_CHUNK):
        chunk = acc[start:start + _TIE_CHUNK]
        pos = torch.nonzero(chunk.abs() == thr).flatten()[:need]
        found.append(pos + start)
        need -= pos.numel()
        if need == 0:
            break
    return torch.cat(found) if found else acc.new_zeros(0, dtype=torch.int64)


def _threshold_estimate(acc, k, oversample=_OVERSAMPLE):
    """A magnitude that about ``oversample * k`` entries reach, from a strided sample
    (deterministic)."""
    n = acc.numel()
    stride = max(1, n // _SAMPLE_SIZE) | 1  # odd: less likely to alias with tensor shapes
    sample = acc[::stride].abs()
    j = min(sample.numel(), math.ceil(oversample * k / stride) + 8)
    return torch.topk(torch.nan_to_num(sample, nan=0.0), j, sorted=False).values.min()


def _above(acc, thr, k):
    """Ascending positions of the entries with |acc| > thr, and those |acc|.

    At low density, reads acc twice through block maxima and minima (no n-sized output is
    written), then looks inside the few blocks that reach past thr (a block holding a NaN is
    looked into).  When most blocks would hold a candidate, one direct comparison pass.
    """
    n = acc.numel()
    if _OVERSAMPLE * k * _BLOCK * 4 > n:
        positions = torch.nonzero((acc > thr) | (acc < -thr)).flatten()
        return positions, acc.index_select(0, positions).abs()
    main = n - n % _BLOCK
    blocks = acc[:main].view(-1, _BLOCK)
    top, bottom = blocks.amax(1), blocks.amin(1)
    hit = torch.nonzero((top > thr) | (bottom < -thr) | torch.isnan(top)).flatten()
    magnitude = blocks.index_select(0, hit).abs().reshape(-1)
    inside = torch.nonzero(magnitude > thr).flatten()
    positions = hit[inside // _BLOCK] * _BLOCK + inside % _BLOCK
    values = magnitude[inside]
    if main < n:
        tail = acc[main:].abs()
        in_tail = torch.nonzero(tail > thr).flatten()
        positions, values = torch.cat([positions, in_tail + main]), torch.cat([values,
                                                                               tail[in_tail]])
    return positions, values


def select_topk(acc, k):
    """Ascending int32 indices of the k largest |acc| of a 1-D tensor, ties by lower index.

    1. thr = an estimate of the magnitude about 2k entries reach (strided sample);
    2. candidates C = {i : |acc[i]| > thr}, found from per-block max / min (two reads of acc,
       no n-sized buffer written);
    3. if |C| >= k, the answer lies in C: exact selection among C (split at the k-th value);
    4. else the answer is C plus the lowest-index entries with |acc| == thr (ties at the
       threshold: integer-valued or all-zero gradients), found by a chunked scan;
    5. if even that is short of k (the sample overestimated), again from a lower threshold,
       and at last an exact selection over all entries.
    """
    n = acc.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == n:
        return torch.arange(n, dtype=torch.int32, device=acc.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.int32, device=acc.device)
    if n <= 4 * _SAMPLE_SIZE:  # small buffers: a selection over all entries is cheap
        return _topk_positions(acc.abs(), k).to(torch.int32)

    for oversample in (_OVERSAMPLE, 4 * _OVERSAMPLE):  # a second, lower threshold if short
        thr = _threshold_estimate(acc, k, oversample)
        cand, magnitude = _above(acc, thr, k)
        if cand.numel() >= k:
            return cand[_topk_positions(magnitude, k)].to(torch.int32)
        ties = _first_equal(acc, thr, k - cand.numel())
        if cand.numel() + ties.numel() >= k:
            return torch.sort(torch.cat([cand, ties])).values.to(torch.int32)
        logger.debug("gtopk_hvd: threshold estimate too high (%d of %d entries reach it)",
                     cand.numel() + ties.numel(), k)
    return _topk_positions(acc.abs(), k).to(torch.int32)


_SMALL_SELECT = 4096  # select_topk_many: buffers up to this size are selected together


def select_topk_many(accs, ks):
    """[select_topk(acc, k) for each buffer], the same indices: the buffers of at most
    ``_SMALL_SELECT`` entries (a layer's biases and norms) ranked together by one segmented
    ranking (two stable sorts, as :func:`merge_truncate_many`), the others one by one."""
    out = [None] * len(accs)
    small = [b for b, acc in enumerate(accs) if acc.numel() <= _SMALL_SELECT]
    if len(small) > 1:
        for b in small:
            if not 0 <= ks[b] <= accs[b].numel():
                raise ValueError(f"k must be in [0, {accs[b].numel()}], got {ks[b]}")
        for b, chosen in zip(small, _select_segmented([accs[b] for b in small],
                                                      [ks[b] for b in small])):
            out[b] = chosen
    return [select_topk(acc, k) if chosen is None else chosen
            for acc, k, chosen in zip(accs, ks, out)]


def _select_segmented(accs, ks):
    device = accs[0].device
    sizes = torch.tensor([acc.numel() for acc in accs], device=device)
    buffer = torch.repeat_interleave(torch.arange(len(accs), device=device), sizes)
    keep, starts = _largest_per_segment(torch.cat([acc.reshape(-1) for acc in accs]), buffer,
                                        ks)
    positions = (keep - starts[buffer[keep]]).to(torch.int32)
    return torch.split(positions, list(ks))


def _largest_per_segment(values, segment, ks):
    """(keep, starts): the ascending positions of the ks[b] largest |values| of each segment b
    (NaN below every number, ties by lower position, as :func:`_topk_positions`), and where
    each segment starts.  ``segment``: the segment of each entry, non-decreasing.  Entries
    come in (segment, position) order, so a stable sort by magnitude then one by segment rank
    every segment's entries."""
    device = values.device
    magnitude = torch.nan_to_num(values.abs(), nan=-1.0)
    order = torch.sort(magnitude, descending=True, stable=True).indices
    order = order[torch.sort(segment[order], stable=True).indices]
    counts = torch.bincount(segment, minlength=len(ks))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(values.numel(), device=device) - starts[segment[order]]
    limit = torch.tensor(list(ks), device=device)
    return torch.sort(order[rank < limit[segment[order]]]).values, starts


_polite = {}  # (id of the Horovod module, local size) -> whether wait() sleeps


def wait(hvd, handle):
    """``hvd.synchronize(handle)``; on a host with more ranks than cores (or with
    GTOPK_HVD_WAIT=sleep) by polling with short sleeps first, so that a waiting rank leaves
    the cores to the ranks it waits for (gtopk_hvd.common.threads.waits_politely)."""
    key = (id(hvd), hvd.local_size())
    if key not in _polite:
        _polite[key] = waits_politely(host_cores(), key[1])
    if _polite[key]:
        for delay in sleeps():
            if hvd.poll(handle):
                break
            time.sleep(delay)
    return hvd.synchronize(handle)


def all_finite(tensors):
    """Whether every entry of every tensor is finite: one read pass per tensor and one sync.

    A sum is the cheapest reduction that a NaN or an Inf reaches; a non-finite sum of finite
    entries (overflow) is told apart by max / min, on that rare path only.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t.amax()) and torch.isfinite(t.amin())) for t in tensors)


def merge_truncate(low, high, k):
    """Union of the sparse sets ``low`` and ``high`` ((values, indices), each sorted by index
    and unique), values added low + high where an index is in both, then the k entries of
    largest |value| (ties by lower index), sorted by index.  Returns (values, indices).
    """
    low_values, low_indices = low
    high_values, high_indices = high
    indices, inverse = torch.unique(torch.cat([low_indices, high_indices]), sorted=True,
                                    return_inverse=True)
    n_low = low_indices.numel()
    values = torch.zeros(indices.numel(), dtype=torch.float32, device=indices.device)
    # assign the low values, then add the high ones: exactly low + high, as the reference
    values[inverse[:n_low]] = low_values
    values.index_add_(0, inverse[n_low:], high_values)
    if indices.numel() > k:
        keep = _topk_positions(values.abs(), k)
        values, indices = values[keep], indices[keep]
    return values, indices.to(torch.int32)


_MANY_MAX = 1 << 16  # merge_truncate_many: one segmented merge up to this many kept entries


def merge_truncate_many(lows, highs, ks):
    """:func:`merge_truncate` of every pair ``(lows[b], highs[b])`` with ``ks[b]``, the same
    results bit for bit, in a few tensor operations for all of them: buffer b's indices are
    keyed ``b << 32 | index``, so one union adds every buffer's low and high values, one
    stable sort by magnitude (NaN lowest, then by index) followed by one by buffer ranks each
    buffer's entries, and the first ``ks[b]`` of each are kept, back in index order.  Many
    small buffers (``granularity="layer"``) merge at the cost of a few large operations;
    beyond ``_MANY_MAX`` entries in all, one merge per buffer (linear-time selection, no
    sort of the values).  Returns a list of (values, indices)."""
    n = len(ks)
    if n == 1 or sum(ks) > _MANY_MAX:
        return [merge_truncate(low, high, k) for low, high, k in zip(lows, highs, ks)]
    device = lows[0][1].device

    def keyed(sets):
        sizes = torch.tensor([i.numel() for _, i in sets], device=device)
        buffer = torch.repeat_interleave(torch.arange(n, device=device), sizes)
        keys = torch.cat([i for _, i in sets]).long() | (buffer << 32)
        return torch.cat([v for v, _ in sets]), keys

    low_values, low_keys = keyed(lows)
    high_values, high_keys = keyed(highs)
    keys, inverse = torch.unique(torch.cat([low_keys, high_keys]), sorted=True,
                                 return_inverse=True)
    n_low = low_keys.numel()
    values = torch.zeros(keys.numel(), dtype=torch.float32, device=device)
    values[inverse[:n_low]] = low_values  # low + high, as merge_truncate
    values.index_add_(0, inverse[n_low:], high_values)
    keep, _ = _largest_per_segment(values, keys >> 32, ks)
    values, keys = values[keep], keys[keep]
    kept = torch.bincount(keys >> 32, minlength=n).tolist()
    indices = (keys & 0xFFFFFFFF).to(torch.int32)
    return list(zip(torch.split(values, kept), torch.split(indices, kept)))


class TorchOps:
    """The :class:`~gtopk_hvd.common.collective.TensorOps` of PyTorch.

    Args:
        hvd: the Horovod module whose ``allgather`` the exchange uses (``horovod.torch``).
        device: where the masks and empty sets it creates live (the gradients' device).
    """

    def __init__(self, hvd, device="cpu"):
        self.hvd = hvd
        self.device = torch.device(device)

    def select_topk(self, acc, k):
        return select_topk(acc, k)

    def select_topk_many(self, accs, ks):
        return select_topk_many(accs, ks)

    def take(self, x, indices):
        return x.index_select(0, indices)

    def take_none(self, values, indices):
        return values[:0], indices[:0]

    def meta(self, digest, flags):
        return make_meta(digest, int(flags))  # eager: the header's meta is a Python int

    def or_nonfinite(self, flags, values):
        return flags | (0 if bool(torch.isfinite(values).all()) else NONFINITE)

    def round_to_wire(self, values, wire):
        return values.half().float() if wire == "float16" else values

    def pack(self, values, indices, meta, wire="float32"):
        if wire == "float16":  # (n, meta), the n indices, the float16 values two to an int32
            n = values.numel()
            halves = torch.zeros(n + n % 2, dtype=torch.float16, device=self.device)
            halves[:n] = values
            header = torch.tensor([n, meta], dtype=torch.int32, device=self.device)
            return torch.cat([header, indices.to(torch.int32), halves.view(torch.int32)])
        # one message per stage: a header row (n, meta), then float32 values bit-cast to
        # int32 next to the int32 indices
        header = torch.tensor([[values.numel(), meta]], dtype=torch.int32, device=self.device)
        body = torch.stack([values.to(torch.float32).view(torch.int32),
                            indices.to(torch.int32)], dim=1)
        return torch.cat([header, body])

    def allgather(self, message, process_set, name):
        return wait(self.hvd, self.hvd.allgather_async(message, name=name,
                                                       process_set=process_set))

    def unpack(self, gathered, members, wire="float32"):
        blocks, pos = [], 0
        if wire == "float16":
            for _ in range(members):
                count, meta = gathered[pos:pos + 2].tolist()
                words = (count + 1) // 2
                indices = gathered[pos + 2:pos + 2 + count]
                halves = gathered[pos + 2 + count:pos + 2 + count + words].contiguous()
                blocks.append((halves.view(torch.float16)[:count].float(), indices, meta))
                pos += 2 + count + words
            return blocks
        for _ in range(members):
            count, meta = gathered[pos].tolist()
            body = gathered[pos + 1:pos + 1 + count]
            blocks.append((body[:, 0].contiguous().view(torch.float32), body[:, 1].contiguous(),
                           meta))
            pos += 1 + count
        return blocks

    def merge_meta(self, mine, theirs):
        return merge_meta(mine, theirs)

    def flags_of(self, meta):
        return meta & ALL_FLAGS

    def holds(self, values, n):
        return values.numel() == n

    def choose(self, ok, theirs, mine):
        return theirs if ok else mine

    def split_set(self, values, indices, ks):
        return list(zip(torch.split(values, list(ks)), torch.split(indices, list(ks))))

    def concat_sets(self, sets):
        return torch.cat([v for v, _ in sets]), torch.cat([i for _, i in sets])

    def merge_truncate(self, low, high, k):
        return merge_truncate(low, high, k)

    def merge_truncate_many(self, lows, highs, ks):
        return merge_truncate_many(lows, highs, ks)

    def isin_many(self, as_, bs):
        return [torch.isin(a, b) for a, b in zip(as_, bs)]

    def logical_and(self, a, b):
        return a & b

    def full_mask(self, k):
        return torch.ones(k, dtype=torch.bool, device=self.device)

    def add_flag(self, flags, flag):
        return flags | flag

    def length(self, values):
        return values.numel()

    def with_length(self, x, n):
        return x
