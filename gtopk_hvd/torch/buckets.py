"""The bucketed gTop-k exchange of one step, overlapped with the backward pass.

``granularity="bucket"`` (:class:`gtopk_hvd.torch.DistributedOptimizer`): each bucket of
:func:`gtopk_hvd.common.buckets.make_buckets` is one gTop-k buffer.  :class:`BucketPipeline`
performs the advances of :func:`gtopk_hvd.common.buckets.pipeline_order` (select, then one
Horovod ``allgather_async`` per stage inside the stage's process set, ``gtopk.<bucket>.s<s>``)
on this rank: from the gradient hooks without ever blocking (``advance(block=False)`` stops
at the first advance whose gradients or previous stage are not there yet) and, in
``synchronize()``, to the end (``advance(block=True)``).  Every rank issues the same
operations in the same order; only when differs.

Hierarchical gTop-k (``hierarchical=True``): each bucket is one hierarchical step
(gtopk_hvd.common.hierarchy): its node alltoall, its rail's stages and its node allgather are
the bucket's stages, ``{name}.{bucket}.h.node.rs`` ... , in the same pipeline order.
"""
import horovod.torch as hvd

from gtopk_hvd.common.buckets import pipeline_order
from gtopk_hvd.common.collective import MISMATCH, gtopk_exchange_steps
from gtopk_hvd.common.hierarchy import hierarchical_exchange_steps
from gtopk_hvd.common.process_sets import exchange_sets, process_set_for_stage
from gtopk_hvd.common.schedule import world_split
from gtopk_hvd.torch.hierarchical import answer, issue
from gtopk_hvd.torch.ops import TorchOps, wait

__all__ = ["BucketPipeline"]


class BucketPipeline:
    """One step's exchanges of the buckets on this rank; ``tensors``: how many gradients each
    bucket waits for (:meth:`arrived` counts them).

    prepare(b): (acc, k, flags, residual) of bucket b, called once its gradients are all
        there (acc: the compensated flat float32 buffer; flags: NONFINITE when it is not
        finite; residual: None, or with ``hierarchy`` the residual of this rank's shard, which
        the hierarchical step adds after the node's sum to acc, then the buffer's gradients,
        and k the shard's).
    hierarchy: (layout, process sets) of hierarchical gTop-k, or None.
    digest / wire / name: as :func:`gtopk_hvd.common.collective.gtopk_exchange`; bucket b's
        operations are ``{name}.{b}.s<stage>`` (bucket 0 meets the exchange of the other
        granularities, ``{name}.0``, so ranks set up differently are refused, not left waiting).

    After ``advance(block=True)``: ``results`` (one ExchangeResult per bucket, None past a
    mismatch) and ``verdict`` (the flags of every bucket's exchange ORed).
    """

    def __init__(self, tensors, prepare, digest, wire="float32", name="gtopk", hierarchy=None):
        buckets = len(tensors)
        self.size, self.rank = hvd.size(), hvd.rank()
        self._prepare, self._digest, self._wire, self._name = prepare, digest, wire, name
        self._hierarchy = hierarchy
        # the waits of a bucket: its gTop-k stages; hierarchical: the node alltoall, the
        # rail's stages and the node allgather
        self._stages = world_split(self.size)[0] if hierarchy is None else \
            world_split(hierarchy[0].nodes)[0] + 2
        self._order = pipeline_order(buckets, self._stages)
        self._pos = 0
        self._waiting = list(tensors)  # gradients each bucket still waits for
        self._steps = [None] * buckets
        self._handles = [None] * buckets
        self._kinds = [None] * buckets  # what each bucket's pending request is
        self._sets = exchange_sets(hvd) if self.size > 1 else {}
        self.results = [None] * buckets
        self.accs = [None] * buckets
        self.verdict = 0
        self.started = False  # whether an operation was issued (zero_grad must not drop it)

    def arrived(self, bucket):
        """One more of bucket ``bucket``'s gradients is complete."""
        self._waiting[bucket] -= 1

    def advance(self, block):
        """Perform the advances in order; without ``block`` stop at the first that would wait.
        Returns whether every advance is done."""
        while self._pos < len(self._order):
            bucket, stage = self._order[self._pos]
            if stage == 0:
                if not (block or self._waiting[bucket] <= 0):
                    return False
                acc, k, flags, residual = self._prepare(bucket)
                self.accs[bucket] = acc
                self._steps[bucket] = self._exchange(bucket, acc, k, flags, residual)
                self._resume(bucket, None)
            else:
                handle = self._handles[bucket]
                if not block and not hvd.poll(handle):
                    return False
                self._resume(bucket, answer(self._kinds[bucket], wait(hvd, handle)))
            self._pos += 1
            if bucket == 0 and stage == self._stages and self.verdict & MISMATCH:
                self._pos = len(self._order)  # set-ups differ: issue nothing more
        return True

    def _exchange(self, bucket, acc, k, flags, residual):
        """Bucket ``bucket``'s exchange, a generator of (kind, payload, process set, name)
        requests whose value is its ExchangeResult (HierarchicalExchange)."""
        ops = TorchOps(hvd, device=acc.device)
        if self._hierarchy is None or residual is None:  # (nothing sparse: headers only)
            steps = gtopk_exchange_steps(
                ops, [acc], [k], self.rank, self.size,
                lambda stage: process_set_for_stage(self._sets, stage),
                name=f"{self._name}.{bucket}", digest=self._digest, flags=flags,
                wire=self._wire)
            results = yield from _relay(steps, lambda message, process_set, op: (
                "allgather", message, process_set, op))
            return results[0]
        layout, sets = self._hierarchy
        steps = hierarchical_exchange_steps(ops, acc, residual, k, layout, self.rank,
                                            f"{self._name}.{bucket}.h", self._digest, flags,
                                            self._wire)
        return (yield from _relay(steps, lambda kind, payload, group, op: (
            kind, payload, sets[group], op)))

    def _resume(self, bucket, answered):
        steps = self._steps[bucket]
        try:
            kind, payload, process_set, op = next(steps) if answered is None else \
                steps.send(answered)
        except StopIteration as finished:
            self.results[bucket] = finished.value
            self.verdict |= int(finished.value.verdict)
            self._steps[bucket] = self._handles[bucket] = None
            return
        self._kinds[bucket] = kind
        self._handles[bucket] = issue(kind, payload, process_set, op)
        self.started = True


def _relay(steps, request):
    """Run the generator ``steps``, yielding ``request(*its request)`` for each of its
    requests and sending the answers back; its value."""
    reply = None
    try:
        while True:
            reply = yield request(*steps.send(reply))
    except StopIteration as finished:
        return finished.value
