"""The TensorFlow :class:`~gtopk_hvd.common.step.StepBackend`: one step's tensor operations
over a list of gradients, their variables and the residuals of a
:class:`~gtopk_hvd.tensorflow.state.GTopkState`.

gtopk_hvd.common.step runs the step with it, eagerly or inside ``tf.function``: in a graph
``finite`` is a bool tensor, so what depends on the verdict is computed after it
(:func:`~gtopk_hvd.tensorflow.collective.after_verdict`) and residuals are assigned only on a
finite step.  The reduced gradients are collected in ``out`` (one per variable, in order).
"""
import time

import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.collective import (JOINED, VERDICT_TAIL, GTopkResult,
                                         allreduce_with_verdict)
from gtopk_hvd.common.hierarchy import hierarchical_exchange_steps, split_bytes
from gtopk_hvd.common.step import AppliesNothing, StepBackend
from gtopk_hvd.common.validation import layout_key
from gtopk_hvd.tensorflow.collective import (after_verdict, check_verdict, compensate,
                                             decompress, exchange, exchange_grouped,
                                             nonfinite_flag, plan_digest_tensor,
                                             update_residual)
from gtopk_hvd.tensorflow.hierarchical import drive
from gtopk_hvd.tensorflow.ops import TFOps, op_name_safe, zeros

__all__ = ["TFStep", "JoinedTFStep", "TensorStep", "Item"]


class Item:
    """One gradient to reduce: its position in the list, the (dense) gradient, its variable."""

    def __init__(self, index, grad, variable):
        self.index, self.grad, self.variable = index, grad, variable
        self.numel = variable.shape.num_elements()


def _flatten(tensors):
    return tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], 0)


def _split(flat, sizes):
    return tf.split(flat, sizes) if len(sizes) > 1 else [flat]


def _unflatten(flat, like):
    parts = _split(flat, [g.shape.num_elements() for g in like])
    return [tf.cast(tf.reshape(p, g.shape), g.dtype) for p, g in zip(parts, like)]


def when(finite, value, fallback):
    """``value`` on a finite step, else ``fallback()`` (Python bool eagerly, tensor in a
    graph)."""
    if isinstance(finite, bool):
        return value if finite else fallback()
    return tf.cond(finite, lambda: tf.identity(value), fallback)


class TFStep(StepBackend):
    """One synchronisation of ``items`` (:class:`Item`) with ``state``'s residuals.

    config: the step's :class:`~gtopk_hvd.common.step.StepConfig`; op: Horovod's reduce op;
    finish: ``finish(finite, stats)``, the state's record of the step.
    hierarchy: hierarchical gTop-k's (layout, process sets, k of this rank's shard of each
    buffer), or None; acc is then the buffer's gradients and the residual of this rank's
    shard joins after the node's reduce-scatter, as in gtopk_hvd.torch.step.TorchStep.
    """

    def __init__(self, state, config, items, op, finish, hierarchy=None):
        self.size = hvd.size()
        self.state, self.config, self.op, self._finish = state, config, op, finish
        self.out = [it.grad for it in items]
        self.average_over = self.size if config.op == "Average" else 1
        self.hierarchy, self.shard_terms, self._split = hierarchy, [], {}

    def _residuals(self, buffer):
        return [self.state.residual(it.variable) for it in buffer.members]

    # 1. compensate ---------------------------------------------------------------------

    def compensate(self, buffer, scale, predivide):
        if self.hierarchical(buffer):  # the shard's residual joins after the node's sum
            self.add_shard_residual(buffer, scale, predivide)
            acc = _flatten([it.grad for it in buffer.members])
            carry = self.carry(buffer)  # what a move left outside the shard, if pending
            if carry is not None:
                acc = tf.cond(self.carry_pending(buffer).read_value(),
                              lambda: compensate(acc, carry.read_value(), scale), lambda: acc)
            return acc * (1.0 / predivide) if predivide != 1.0 else acc
        acc = compensate(_flatten([it.grad for it in buffer.members]),
                         _flatten([eps.read_value() for eps in self._residuals(buffer)]), scale)
        return acc * (1.0 / predivide) if predivide != 1.0 else acc

    def hierarchical(self, buffer):
        """Whether ``buffer`` runs hierarchical gTop-k this step (a step's sparsified buffers,
        where it runs hierarchically)."""
        return self.hierarchy is not None and buffer.method != "dense"

    def carry(self, buffer):
        """The buffer's carry (GTopkState.carry: ``algorithm="auto"``, a Horovod Elastic
        reset), None where there is none."""
        return self.state.carry(buffer.name, buffer.numel, layout_key(self.hierarchy),
                                create=False)

    def carry_pending(self, buffer):
        return self.state.carry_pending(buffer.name, layout_key(self.hierarchy))

    def shard_residual(self, buffer):
        """Hierarchical gTop-k: the residual of this rank's shard of ``buffer``."""
        layout = self.hierarchy[0]
        lo, hi = layout.shard(buffer.numel, hvd.rank())
        return self.state.shard_residual(buffer.name, hi - lo, layout_key(self.hierarchy))

    def add_shard_residual(self, buffer, scale, predivide):
        """Hierarchical gTop-k: this rank's shard residual, in the gradients' units, to add
        after the node's reduce-scatter."""
        eps = self.shard_residual(buffer).read_value()
        same = isinstance(scale, float) and scale == predivide
        self.shard_terms.append(eps if same else eps * (scale / predivide))

    def flat_grads(self, members):
        return _flatten([it.grad for it in members])

    def concat(self, parts):
        return tf.concat(parts, 0) if len(parts) > 1 else parts[0]

    # 2. plan and verdict -----------------------------------------------------------------

    def nonfinite_flag(self, tensors):
        return nonfinite_flag(tensors)

    def digest(self, plan, ks, runtime_scale):
        return plan_digest_tensor(plan, ks, runtime_scale)

    def check_verdict(self, verdict, plan, ks, runtime_scale):
        return check_verdict(verdict, plan, ks, runtime_scale)

    def after_verdict(self, finite, tensor):
        return after_verdict(finite, tensor)

    # 3. exchange -------------------------------------------------------------------------

    def exchange(self, accs, ks, algorithm, name, digest, flags, wire):
        if self.hierarchy is not None:  # one hierarchical step a buffer, one verdict
            layout, sets, shard_ks = self.hierarchy
            results, verdict = [], None
            for i, (acc, eps, k) in enumerate(zip(accs, self.shard_terms, shard_ks)):
                results.append(drive(hierarchical_exchange_steps(
                    TFOps(hvd), acc, eps, k, layout, hvd.rank(), f"{name}.h{i}", digest, flags,
                    wire), sets))
                verdict = results[-1].verdict if verdict is None else \
                    tf.bitwise.bitwise_or(verdict, results[-1].verdict)
            for result in results:
                result.verdict = verdict
            self.split_bytes(results)
            return results
        name = op_name_safe(name)
        if algorithm == "gtopk":
            return exchange_grouped(accs, ks, name=name, digest=digest, flags=flags, wire=wire)
        return [exchange(accs[0], ks[0], algorithm, name=name, digest=digest, flags=flags,
                         wire=wire)]

    def split_bytes(self, results):
        """Hierarchical gTop-k: the statistics' bytes sent inside the node and across nodes,
        from the step's HierarchicalExchange results."""
        self._split = split_bytes(results)

    def empty(self):
        return zeros([0])

    def dense_allreduce(self, flat):
        predivide = self.config.predivide
        return hvd.allreduce(flat, name=op_name_safe(f"{self.config.name}.dense"), op=self.op,
                             prescale_factor=1.0 / predivide, postscale_factor=predivide,
                             compression=hvd.Compression.fp16 if self.config.wire == "float16"
                             else hvd.Compression.none)

    def dense_allreduce_with_verdict(self, parts, digest, flags):
        def allreduce(tail):  # eagerly only (dense_first)
            flat = self.dense_allreduce(self.concat(parts + [tf.constant(tail, tf.float32)]))
            return flat, flat[-VERDICT_TAIL:].numpy().tolist()
        return allreduce_with_verdict(allreduce, int(digest), int(flags), self.size,
                                      self.config.op == "Average", tf.errors.OpError)

    # 4. scatter and residual -----------------------------------------------------------

    def write_sparse(self, buffer, result, finite):
        # a mismatch may have sent indices of another layout: only read them once checked
        result.values = after_verdict(finite, result.values)
        result.indices = after_verdict(finite, result.indices)
        reduced = decompress(result, buffer.numel, self.config.sparse_algorithm,
                             self.average_over, self.config.predivide)
        self.write_dense(buffer.members, reduced)

    def commit(self, buffer, acc, result, carried, finite):
        if self.hierarchy is not None:  # acc of this rank's shard, from the exchange
            eps = self.shard_residual(buffer)
            eps.assign(when(finite, update_residual(result.acc, result, carried),
                            eps.read_value))
            carry = self.carry(buffer)
            if carry is not None:  # a pending one went into this step's gradients
                pending = self.carry_pending(buffer)

                def clear():
                    carry.assign(tf.zeros_like(carry))
                    pending.assign(False)
                    return tf.constant(True)
                tf.cond(tf.logical_and(finite, pending.read_value()), clear,
                        lambda: tf.constant(False))
            return
        rest = update_residual(acc, result, carried)
        for eps, value in zip(self._residuals(buffer),
                              _split(rest, [it.numel for it in buffer.members])):
            eps.assign(when(finite, value, eps.read_value))

    def write_dense(self, members, flat):
        for it, value in zip(members, _unflatten(flat, [it.grad for it in members])):
            self.out[it.index] = value

    def clear_residual(self, buffer, finite):
        for eps in self._residuals(buffer):
            eps.assign(when(finite, tf.zeros_like(eps), eps.read_value))

    def nonfinite(self, finite):
        self.out = [when(finite, g, lambda g=g: tf.fill(tf.shape(g),
                                                        tf.constant(float("nan"), g.dtype)))
                    for g in self.out]

    # 5. statistics -----------------------------------------------------------------------

    def finish(self, finite, stats):
        # hierarchical: what stayed inside the node and what crossed the network
        self._finish(finite, dict(stats, **self._split) if self._split else stats)


class JoinedTFStep(AppliesNothing, TFStep):
    """The step of a rank that called ``join()`` (gtopk_hvd.tensorflow.join): zeros and the
    JOINED flag (no plan of its own to compare), nothing applied, residuals kept; the
    schedule step and the count of non-finite steps move as the others' do.
    ``all_joined``: whether the verdict says every rank joined (a bool, or a bool tensor in a
    graph); then nothing moves."""

    all_joined = False

    def compensate(self, buffer, scale, predivide):
        if self.hierarchical(buffer):  # nothing of this rank's shard residual either
            layout = self.hierarchy[0]
            lo, hi = layout.shard(buffer.numel, hvd.rank())
            self.shard_terms.append(zeros([hi - lo]))
        return zeros([buffer.numel])

    def flat_grads(self, members):
        return zeros([sum(it.numel for it in members)])

    def commit(self, buffer, acc, result, carried, finite):
        """Flat: nothing, its residuals are kept as they are.  Hierarchical: this rank's shard
        of its node's sum carries the other local ranks' gradients; what of it did not reach
        the result joins this rank's residual (kept otherwise), so nothing is lost
        (gtopk_hvd.common.reference.hierarchical_step with ``joined``)."""
        if self.hierarchy is None:
            return
        eps = self.shard_residual(buffer)
        left = update_residual(result.acc, result, carried)
        eps.assign(when(finite, left + eps.read_value(), eps.read_value))

    def nonfinite_flag(self, tensors):
        return JOINED

    def check_verdict(self, verdict, plan, ks, runtime_scale):
        finite = super().check_verdict(verdict, plan, ks, runtime_scale)
        if isinstance(finite, bool):
            self.all_joined = bool(int(verdict) & JOINED)
            return finite and not self.all_joined
        self.all_joined = tf.not_equal(tf.bitwise.bitwise_and(verdict, JOINED), 0)
        return finite

    def finish(self, finite, stats):
        self.state.record_joined_step(finite, self.all_joined)


class TensorStep(TFStep):
    """The step backend of ``gtopk_allreduce``: one buffer, the tensor; the residual is the
    caller's (None: zeros), returned new (or as it was on a non-finite step)."""

    def __init__(self, config, tensor, residual, profile):
        super().__init__(None, config, [], None, lambda finite, stats: None)
        self.tensor, self.profile, self.timings = tensor, profile, {}
        numel = tensor.shape.num_elements()
        self.old_residual = tf.zeros([numel], tf.float32) if residual is None else residual
        self.residual = residual
        self.result = self.dense = None
        self.new_residual, self.finite = self.old_residual, True

    def compensate(self, buffer, scale, predivide):
        self.acc = compensate(self.tensor, self.residual)
        return self.acc

    def exchange(self, accs, ks, algorithm, name, digest, flags, wire):
        # one buffer: its stages are {name}.s<stage> (Top-k: {name}), as before the step driver
        self.result = exchange(accs[0], ks[0], algorithm, self.config.name, self.profile,
                               digest, flags, wire)
        return [self.result]

    def commit(self, buffer, acc, result, carried, finite):
        start = time.perf_counter()
        new = update_residual(acc, result)
        old = self.old_residual
        self.new_residual = new if isinstance(finite, bool) else \
            tf.cond(finite, lambda: new, lambda: tf.identity(old))
        self.timings["residual"] = time.perf_counter() - start

    def write_sparse(self, buffer, result, finite):
        start = time.perf_counter()
        result.indices = after_verdict(finite, result.indices)
        self.dense = decompress(result, buffer.numel, self.config.sparse_algorithm,
                                self.average_over)
        self.timings["decompress"] = time.perf_counter() - start

    def nonfinite(self, finite):
        if finite is False:  # eagerly: the same NaN everywhere, the residual as it was
            self.finite = False
            self.dense = tf.fill([self.tensor.shape.num_elements()], float("nan"))
        elif not isinstance(finite, bool):
            self.finite = finite
            self.dense = tf.where(finite, self.dense, float("nan"))

    def gtopk_result(self, k):
        """The :class:`~gtopk_hvd.common.collective.GTopkResult` of the step."""
        output = tf.cast(tf.reshape(self.dense, self.tensor.shape), self.tensor.dtype)
        result = GTopkResult(output, self.new_residual, self.result, k)
        result.finite = self.finite
        if self.profile:
            result.timings.update(self.timings)
        return result
