"""Hierarchical gTop-k with TensorFlow: Horovod performs the requests of the core's step
(gtopk_hvd.common.hierarchy.hierarchical_exchange_steps) in the node and rail process sets,
eagerly or inside ``tf.function``.  The PyTorch counterpart is gtopk_hvd.torch.hierarchical.

Used by ``gtopk_allreduce(..., hierarchical=True)``; the sets come from
``gtopk_hvd.tensorflow.init(hierarchical=True)``
(gtopk_hvd.common.process_sets.hierarchical_sets).
"""
import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.hierarchy import drive_requests, hierarchical_exchange_steps
from gtopk_hvd.common.plan import plan_digest
from gtopk_hvd.common.process_sets import agree_on_mode
from gtopk_hvd.tensorflow.collective import check_verdict
from gtopk_hvd.tensorflow.ops import TFOps, op_name_safe

__all__ = ["hierarchical_exchange", "drive", "gather_modes", "check_mode", "check_call_mode"]


def drive(steps, sets):
    """Perform the requests of a hierarchical step with Horovod, eagerly or in a graph (each
    group's process set from ``sets``); its result."""
    def alltoall(parts, group, name):
        splits = tf.constant([int(p.shape[0]) for p in parts], tf.int32)
        received, counts = hvd.alltoall(tf.concat(parts, 0), splits=splits,
                                        name=op_name_safe(name), process_set=sets[group])
        return tf.split(received, counts, num=len(parts))

    def allgather(message, group, name):
        return hvd.allgather(message, name=op_name_safe(name), process_set=sets[group])
    return drive_requests(steps, alltoall, allgather)


def hierarchical_exchange(flat, residual, k, layout, sets, name, plan, wire="float32"):
    """One hierarchical step of this rank's flat float32 buffer ``flat`` with its shard's
    ``residual``, eagerly or in a graph; (HierarchicalExchange, finite: a bool, or a bool
    tensor in a graph).  Ranks whose ``plan`` differs raise PlanMismatchError on every
    rank."""
    res = drive(hierarchical_exchange_steps(TFOps(hvd), flat, residual, k, layout, hvd.rank(),
                                             name, plan_digest(plan), 0, wire), sets)
    verdict = int(res.verdict) if tf.executing_eagerly() else res.verdict
    return res, check_verdict(verdict, plan, name=op_name_safe(f"{name}.plan"))


def gather_modes(mode, name):
    """Every rank's ``mode`` (an int), by one allgather over every rank named ``name``,
    eagerly (gtopk_hvd.common.process_sets.agree_on_mode)."""
    return hvd.allgather(tf.constant([mode], tf.int32), name=op_name_safe(name)).numpy().tolist()


def check_mode(name, hierarchical, verified):
    """The optimizers' mode check (gtopk_hvd.common.process_sets.agree_on_mode) in a job
    started with ``init(hierarchical=True)``: eagerly at every step until one verified the
    set-up; in a ``tf.function`` once, when the step named ``name`` is first traced (an eager
    allgather at trace time: every rank traces its first step alike)."""
    if tf.executing_eagerly():
        if not verified:
            agree_on_mode(hvd, name, hierarchical, gather_modes, once=False)
        return
    check_call_mode(name, hierarchical)


def check_call_mode(name, hierarchical):
    """``gtopk_allreduce``'s mode check: once, at the first call named ``name`` (in a
    ``tf.function`` when it is first traced, an eager allgather at trace time)."""
    with tf.init_scope():
        agree_on_mode(hvd, name, hierarchical, gather_modes, once=True)
