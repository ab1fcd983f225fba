"""Buckets for ``granularity="bucket"``: which tensors share a gTop-k buffer, and the one
order in which every rank advances the buckets' exchanges while the backward pass runs.

As Horovod's fusion buffer and DDP's buckets: tensors are taken in reverse registration
order (the order in which backward usually produces their gradients) and a bucket is closed
once it holds ``bucket_cap_mb`` MiB of float32; the first bucket is capped at 1 MiB (DDP's
first bucket) so that communication starts early.  A tensor larger than the cap is a bucket
of its own.  Each bucket is one gTop-k buffer: one top-k over its tensors laid end to end,
k = k_for(bucket size, density), exactly the reference's step on that buffer.

:func:`pipeline_order` is the sequence of *advances* every rank performs, the same on every
rank: advance (b, 0) selects bucket b's top-k and starts stage 0 (it needs b's gradients);
(b, s) for 0 < s < m waits for stage s - 1, merges and starts stage s; (b, m) waits for the
last stage and merges.  A rank performs them strictly in this order; during the backward pass
only as far as it can without blocking (a missing gradient or an unfinished stage stops it
until the next gradient arrives), the rest in ``synchronize()``.  So every rank issues the
same Horovod operations in the same order (only their timing differs), and a blocking wait
is only ever for an operation that every member issues earlier in the same sequence: no
deadlock.  Bucket 0's advances come first: its exchange carries the plan digest to every rank
before any other bucket's operation is issued, so ranks whose buckets differ (another
``bucket_cap_mb``, another model) stop after bucket 0 and are refused, none left waiting.
"""
from gtopk_hvd.common.validation import check_positive_number

__all__ = ["FIRST_BUCKET_MB", "DEFAULT_BUCKET_CAP_MB", "make_buckets", "pipeline_order",
           "check_bucket_cap_mb", "check_bucket_arguments"]

FIRST_BUCKET_MB = 1.0
DEFAULT_BUCKET_CAP_MB = 25.0
_MIB = 1 << 20
_BYTES_PER_ENTRY = 4  # buffers are float32


def check_bucket_cap_mb(bucket_cap_mb):
    """``bucket_cap_mb`` as a float, or a clear error."""
    return float(check_positive_number(bucket_cap_mb, "bucket_cap_mb",
                                       "for example 25 (MiB of float32 per bucket, as DDP)"))


def check_bucket_arguments(algorithm, granularity, bucket_cap_mb):
    """``bucket_cap_mb`` for an optimizer (the default when None), refused where it means
    nothing: without granularity='bucket', or with an algorithm buckets do not run."""
    if granularity != "bucket":
        if bucket_cap_mb is not None:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} applies to "
                             f"granularity='bucket', got granularity={granularity!r}; "
                             f"pass granularity='bucket' or drop bucket_cap_mb")
        return DEFAULT_BUCKET_CAP_MB
    if algorithm != "gtopk":
        raise ValueError(f"granularity='bucket' runs gTop-k, got algorithm={algorithm!r}; pass "
                         f"algorithm='gtopk' or use granularity='model' / 'layer' with "
                         f"{algorithm!r}")
    return DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else check_bucket_cap_mb(bucket_cap_mb)


def make_buckets(numels, bucket_cap_mb=DEFAULT_BUCKET_CAP_MB):
    """The buckets of tensors with ``numels`` elements (in registration order): a list of
    buckets, each a sorted list of positions into ``numels``; bucket 0 holds the last
    tensors."""
    cap = check_bucket_cap_mb(bucket_cap_mb) * _MIB
    first = min(cap, FIRST_BUCKET_MB * _MIB)
    buckets, current, filled = [], [], 0
    for i in reversed(range(len(numels))):
        current.append(i)
        filled += _BYTES_PER_ENTRY * int(numels[i])
        if filled >= (first if not buckets else cap):
            buckets.append(sorted(current))
            current, filled = [], 0
    if current:
        buckets.append(sorted(current))
    return buckets


def pipeline_order(buckets, stages):
    """The advances (bucket, s), s = 0 .. ``stages``, of ``buckets`` buckets whose exchange
    has ``stages`` stages (floor(log2 P)), in the order every rank performs them: all of
    bucket 0's, then the others stage by stage (every bucket's stage 0 in bucket order, then
    every bucket's stage 1, ...).  So the stage-0 exchanges, which need nothing but the
    gradients, start during the backward pass as the buckets fill, however late the partners
    are; and what is left for ``synchronize()`` costs one round per stage for all buckets
    together (in a bucket-major or diagonal order, each bucket's wait would hold back the
    next bucket's start: up to buckets + stages rounds after the backward pass)."""
    if not buckets:
        return []
    return [(0, s) for s in range(stages + 1)] + \
        [(b, s) for s in range(stages + 1) for b in range(1, buckets)]
