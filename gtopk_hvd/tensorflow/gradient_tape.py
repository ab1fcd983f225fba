"""``DistributedGradientTape``: horovod.tensorflow.DistributedGradientTape with gTop-k.

``tape.gradient()`` returns, on every rank, the same sparse average of the gradients instead of
the dense one (gtopk_hvd.tensorflow.gradients).  A tape lives for one step, the residuals must
outlive it: they are kept in a :class:`~gtopk_hvd.tensorflow.state.GTopkState`, passed as
``gtopk_state=`` (to checkpoint it or read its statistics) or else shared by every tape built
with the same hyperparameters in this process.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.cost import as_link
from gtopk_hvd.common.density import as_schedule
from gtopk_hvd.common.errors import GTopkError
from gtopk_hvd.common.process_sets import (hierarchical_sets, is_elastic,
                                           prepare_exchange_sets)
from gtopk_hvd.common.validation import (check_algorithm, check_auto_link,
                                         check_gradient_predivide_factor, check_hierarchical,
                                         check_global_process_set, check_granularity,
                                         check_compression, check_no_groups,
                                         check_non_negative_int, check_op)
from gtopk_hvd.tensorflow.collective import check_tf2_context, op_name
from gtopk_hvd.tensorflow.gradients import allreduce_gradients
from gtopk_hvd.tensorflow.state import GTopkState

__all__ = ["DistributedGradientTape", "PartialDistributedGradientTape", "shared_state",
           "prepare_state"]

logger = logging.getLogger(__name__)

_SHARED = {}


def shared_state(density, algorithm="gtopk", granularity="model", dense_threshold=0,
                 link=None):
    """The :class:`GTopkState` every tape with these hyperparameters shares in this process."""
    schedule, link = as_schedule(density), as_link(link)
    key = (repr(schedule), algorithm, granularity, dense_threshold, link)
    if key not in _SHARED:
        _SHARED[key] = GTopkState(schedule, algorithm, granularity, dense_threshold, link)
    return _SHARED[key]


def check_horovod_arguments(compression, op, gradient_predivide_factor, num_groups, groups,
                            process_set):
    """The Horovod arguments, checked before any collective; returns the keyword arguments of
    :func:`~gtopk_hvd.tensorflow.gradients.allreduce_gradients` they select
    (``gradient_predivide_factor`` and ``wire``)."""
    wire = check_compression(compression, hvd.Compression)
    check_op(op_name(op))
    factor = check_gradient_predivide_factor(gradient_predivide_factor, op_name(op))
    check_no_groups(num_groups, groups)
    check_global_process_set(process_set)
    return {"gradient_predivide_factor": factor, "wire": wire}


def check_loss_scale_optimizer(loss_scale_optimizer):
    """None or something with the ``loss_scale`` of a Keras LossScaleOptimizer."""
    if loss_scale_optimizer is not None and not (
            hasattr(loss_scale_optimizer, "loss_scale")
            and callable(getattr(loss_scale_optimizer, "get_scaled_loss", None))):
        raise TypeError(
            f"loss_scale_optimizer must be the tf.keras.mixed_precision.LossScaleOptimizer "
            f"whose get_scaled_loss() scaled the loss, got "
            f"{type(loss_scale_optimizer).__name__}")


def prepare_state(gtopk_state, make_state, init_call, what, hierarchical=False):
    """The :class:`GTopkState` a tape or optimizer uses (``make_state()`` when None), after the
    checks that must fail on every rank before any collective; then registers the pair sets
    (collective) when the algorithm needs them, and the node and rail sets of hierarchical
    gTop-k."""
    check_tf2_context(f"the gTop-k {what}")  # before a state is made in a TF1 graph
    if gtopk_state is None:
        gtopk_state = make_state()
    elif not isinstance(gtopk_state, GTopkState):
        raise TypeError(f"gtopk_state must be a gtopk_hvd.tensorflow.GTopkState, got "
                        f"{type(gtopk_state).__name__}")
    check_auto_link(gtopk_state.algorithm, gtopk_state.link, is_elastic(),
                    "gtopk_hvd.tensorflow.measure_link")
    # under Horovod Elastic the residuals follow each reset (GTopkState.reshard); "auto"'s
    # moves between the modes do not follow a change of layout there
    check_hierarchical(hierarchical, gtopk_state.algorithm, gtopk_state.granularity,
                       auto=not is_elastic())
    if not hvd.is_initialized():
        raise GTopkError(f"Horovod is not initialised: call {init_call} on every rank before "
                         f"building a gTop-k {what}")
    if gtopk_state.algorithm in ("gtopk", "auto"):
        prepare_exchange_sets(hvd)  # collective registration; every check above ran first
    if hierarchical:
        hierarchical_sets(hvd)
    return gtopk_state


class _DistributedGradientTape(tf.GradientTape):
    """Methods copied into a subclass of the user's tape class, as Horovod does."""

    def __init__(self, tape, op, sparse_as_dense, persistent=False,
                 watch_accessed_variables=True, scale_local_gradients=True, gtopk_state=None,
                 loss_scale_optimizer=None, reduction=None):
        if hasattr(tape, "_watch_accessed_variables"):
            super(self.__class__, self).__init__(persistent, watch_accessed_variables)
        else:
            super(self.__class__, self).__init__(persistent)
        self._tape = tape
        self._op = op
        self._sparse_as_dense = sparse_as_dense
        self._scale_local_gradients = scale_local_gradients
        self._local_sources = set()
        self._gtopk = gtopk_state
        self._loss_scale_optimizer = loss_scale_optimizer
        self._reduction = reduction or {}

    def register_local_source(self, source):
        """Registers a source/variable as worker local: its gradient is not communicated (and
        divided by the world size when ``scale_local_gradients``), as in Horovod."""
        self._local_sources.add(source.ref())

    @tf.autograph.experimental.do_not_convert
    def gradient(self, target, sources, output_gradients=None, use_generic_names=False):
        gradients = super(self.__class__, self).gradient(target, sources, output_gradients)
        sources, gradients = list(sources), list(gradients)
        shared = [i for i, s in enumerate(sources) if s.ref() not in self._local_sources]
        reduced = allreduce_gradients(self._gtopk, [gradients[i] for i in shared],
                                      [sources[i] for i in shared], op=self._op,
                                      sparse_as_dense=self._sparse_as_dense,
                                      name="gtopk" if use_generic_names else "gtopk_tape",
                                      loss_scale=self._loss_scale(), **self._reduction)
        for i, grad in zip(shared, reduced):
            gradients[i] = grad
        if self._scale_local_gradients and self._local_sources:
            for i, s in enumerate(sources):
                if s.ref() in self._local_sources and gradients[i] is not None:
                    gradients[i] = _scale(gradients[i], 1.0 / hvd.size())
        return gradients

    def _loss_scale(self):
        """The scale the target was multiplied by (read at every call), None without one."""
        lso = self._loss_scale_optimizer
        return None if lso is None else lso.loss_scale

    @property
    def gtopk_state(self):
        """The :class:`~gtopk_hvd.tensorflow.state.GTopkState`: schedule, residuals, step."""
        return self._gtopk

    def gtopk_stats(self):
        """Statistics of the last synchronisation on this rank (see GTopkState.gtopk_stats)."""
        return self._gtopk.gtopk_stats()


def _scale(grad, factor):
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


@tf.autograph.experimental.do_not_convert
def DistributedGradientTape(gradtape, device_dense='', device_sparse='',
                            compression=hvd.Compression.none, sparse_as_dense=False,
                            op=hvd.Average, gradient_predivide_factor=1.0,
                            num_groups=0, groups=None, process_set=hvd.global_process_set,
                            scale_local_gradients=True, *, density=0.001, algorithm="gtopk",
                            granularity="model", dense_threshold=0, gtopk_state=None,
                            loss_scale_optimizer=None, link=None, hierarchical=False):
    """A tape that wraps another tf.GradientTape and returns the gTop-k sparse average of the
    gradients, the same on every rank.

    Arguments as ``horovod.tensorflow.DistributedGradientTape``, plus (keyword-only):

    Args:
        density: fraction of gradient entries kept per buffer, a float in (0, 1], a
            :class:`~gtopk_hvd.common.density.DensitySchedule` or ``callable(step)``;
            k = max(1, ceil(density * buffer size)).  1.0 gives the dense average.
        algorithm: ``"gtopk"`` (hypercube merge, O(k log P)), ``"topk"`` (allgather of
            every rank's top-k, O(kP)) or ``"auto"``: per buffer the cheapest of a dense
            allreduce and gTop-k by the cost model (gtopk_hvd.common.cost), the same on every
            rank, in ``gtopk_stats()["methods"]``.
        granularity: ``"model"`` (one top-k over all gradients flattened together, as in the
            paper) or ``"layer"`` (one per tensor).
        dense_threshold: tensors with fewer elements are allreduced densely in float32 (0:
            sparsify everything, as the paper does).
        link: for ``algorithm="auto"``: a :class:`~gtopk_hvd.common.cost.Link` or a tuple
            (alpha, beta[, select[, overhead]]) in seconds; None: measured after the first
            eager step (``measure_link()``).  Inside ``tf.function`` the choice is made when
            the step is traced: pass ``link=`` and a constant density there.
        gtopk_state: a :class:`~gtopk_hvd.tensorflow.GTopkState` holding the residuals; by
            default one shared by all tapes with the same hyperparameters.  Pass your own to
            checkpoint it (``tf.train.Checkpoint(model=..., gtopk=state)``); then density and
            friends come from it.
        loss_scale_optimizer: the ``tf.keras.mixed_precision.LossScaleOptimizer`` whose
            ``get_scaled_loss`` made the target, if any.  The gradients the tape returns stay
            scaled (unscale them with its ``get_unscaled_gradients`` as usual) but the
            residuals are kept in unscaled units, so a change of scale changes nothing, and an
            overflow on any rank gives NaN gradients on every rank: every rank's
            LossScaleOptimizer skips that step and halves its scale.
        hierarchical: hierarchical gTop-k across nodes (docs/tensorflow.md, "Hierarchical
            gTop-k"): a reduce-scatter inside each node, gTop-k across nodes on each rank's
            1/L shard, an allgather inside the node; residuals cover this rank's shard.  Needs
            ``init(hierarchical=True)`` and ``algorithm="gtopk"`` or ``"auto"`` (which then
            also chooses between flat and hierarchical gTop-k by the cost on these nodes);
            unequal hosts or one rank a host run flat gTop-k (logged once).

    ``compression`` is ``Compression.none`` or ``Compression.fp16`` (values travel as float16,
    merges and residuals stay float32), ``op`` is Average or Sum, ``process_set`` the global
    set and ``num_groups`` / ``groups`` unset (use ``granularity``);
    ``gradient_predivide_factor`` works as in Horovod (with Average).  ``device_dense`` /
    ``device_sparse`` are accepted and unused.  Sources must be tf.Variables (they key the
    residuals); sparse gradients need ``sparse_as_dense=True``.

    Example::

        import gtopk_hvd.tensorflow as hvd
        hvd.init()
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x), y)
        tape = hvd.DistributedGradientTape(tape, density=0.01)
        grads = tape.gradient(loss, model.trainable_variables)
    """
    reduction = check_horovod_arguments(compression, op, gradient_predivide_factor, num_groups,
                                        groups, process_set)
    check_loss_scale_optimizer(loss_scale_optimizer)

    def make_state():
        check_algorithm(algorithm, auto=True)
        check_granularity(granularity)
        check_non_negative_int(dense_threshold, "dense_threshold")
        return shared_state(density, algorithm, granularity, dense_threshold, link)
    gtopk_state = prepare_state(gtopk_state, make_state, "gtopk_hvd.tensorflow.init()",
                                "DistributedGradientTape", hierarchical)
    reduction["hierarchical"] = hierarchical
    cls = type(gradtape.__class__.__name__, (gradtape.__class__,),
               dict(_DistributedGradientTape.__dict__))
    if hasattr(gradtape, "_watch_accessed_variables"):
        return cls(gradtape._tape, op, sparse_as_dense, gradtape._persistent,
                   gradtape._watch_accessed_variables, scale_local_gradients=scale_local_gradients,
                   gtopk_state=gtopk_state, loss_scale_optimizer=loss_scale_optimizer,
                   reduction=reduction)
    return cls(gradtape._tape, op, sparse_as_dense, gradtape._persistent,
               scale_local_gradients=scale_local_gradients, gtopk_state=gtopk_state,
               loss_scale_optimizer=loss_scale_optimizer, reduction=reduction)


def PartialDistributedGradientTape(gradtape, device_dense='', device_sparse='',
                                   compression=hvd.Compression.none, sparse_as_dense=False,
                                   op=hvd.Average, gradient_predivide_factor=1.0,
                                   num_groups=0, groups=None,
                                   process_set=hvd.global_process_set, local_layers=None,
                                   scale_local_gradients=True, **gtopk):
    """``horovod.tensorflow.PartialDistributedGradientTape`` with gTop-k: a
    :func:`DistributedGradientTape` (same arguments, the gTop-k ones keyword-only) whose
    ``local_layers`` (a Keras layer or a list of them) keep their gradients local (divided by
    the world size when ``scale_local_gradients``)."""
    if local_layers is None:
        local_layers = []
    elif isinstance(local_layers, tf.keras.layers.Layer):
        local_layers = [local_layers]
    elif not all(isinstance(layer, tf.keras.layers.Layer) for layer in local_layers):
        raise ValueError("All local layers must be of tf.keras.layers.Layer type.")
    tape = DistributedGradientTape(gradtape, device_dense, device_sparse, compression,
                                   sparse_as_dense, op, gradient_predivide_factor, num_groups,
                                   groups, process_set, scale_local_gradients, **gtopk)
    for var in [var for layer in local_layers for var in layer.trainable_weights]:
        tape.register_local_source(var)
    return tape
