"""``Compression.gtopk``: gTop-k as a Horovod Compressor, for Horovod's own TensorFlow tape and
Keras optimizer.

``horovod.tensorflow.DistributedGradientTape(tape, compression=
gtopk_hvd.tensorflow.Compression.gtopk(density=0.01))`` (and ``horovod.tensorflow.keras
.DistributedOptimizer(opt, compression=...)``) run per-tensor gTop-k (the
``granularity="layer"`` of gtopk_hvd's own wrappers) inside Horovod's unmodified code:

- ``compress(tensor)`` builds this tensor's whole gTop-k step (acc = grad + residual, local
  top-k, the hypercube exchanges, the residual update) and returns a one-element placeholder,
  which is all that goes through Horovod's allreduce;
- ``decompress(placeholder, ctx)`` returns the dense result (the global set, divided by P for
  Average), once the placeholder's allreduce and the residual update have run.

Horovod reduces gradients inside a ``tf.function``, where every Horovod operation is
asynchronous and matched by name, so the order in which the graph runs the tensors' exchanges
does not matter; each tensor's exchanges are named after its position in the traced call
(``gtopk.compressor.<i>.s<stage>``), or after Horovod's name when it passes one.  The
residuals (``residuals``: {key: float32 tf.Variable}, per rank) are kept by the compressor and
created outside the function.  Every rank must produce gradients for the same variables, as
plain Horovod requires.  A tensor whose acc is not finite on some rank comes back as NaN on
every rank with every residual kept; a LossScaleOptimizer then skips the step.  Eagerly
(``hvd.allreduce(x, name=..., compression=...)`` outside a ``tf.function``) a name is required:
it keys the residual.
"""
import logging
import weakref

import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.tensorflow.compression import Compression as _HorovodCompression
from horovod.tensorflow.compression import Compressor
from tensorflow.python.framework.func_graph import FuncGraph

from gtopk_hvd.common.compression import (COMPRESSOR_PREFIX, check_compressor_process_set,
                                          horovod_call, op_from_call,
                                          require_name)
from gtopk_hvd.common.density import check_density
from gtopk_hvd.common.process_sets import hierarchical_sets, is_elastic
from gtopk_hvd.common.validation import check_algorithm, check_buffer_numel, check_hierarchical
from gtopk_hvd.tensorflow.collective import check_tf2_context, op_name
from gtopk_hvd.tensorflow.functional import gtopk_allreduce
from gtopk_hvd.tensorflow.ops import zeros

__all__ = ["Compression", "GTopkCompressor"]

logger = logging.getLogger(__name__)


_CONTROL_FLOW_GRAPHS = ("CondBranchFuncGraph", "WhileCondFuncGraph", "WhileBodyFuncGraph")


def _function_graph():
    """The graph of the innermost ``tf.function`` being traced now (a new one per trace; the
    branches of a ``tf.cond`` and loop bodies belong to their function), or None when
    executing eagerly."""
    if tf.executing_eagerly():
        return None
    graph = tf.compat.v1.get_default_graph()
    while (type(graph).__name__ in _CONTROL_FLOW_GRAPHS
           and isinstance(getattr(graph, "outer_graph", None), FuncGraph)):
        graph = graph.outer_graph
    return graph


class GTopkCompressor(Compressor):
    """gTop-k (or Top-k) with error feedback, per tensor, as a Horovod ``Compressor``.

    Args:
        density: fraction of each tensor's entries kept, in (0, 1].
        algorithm: ``"gtopk"`` (hypercube stages, O(k log P)) or ``"topk"`` (allgather).
        hierarchical: hierarchical gTop-k per tensor (docs/tensorflow.md), as PyTorch's
            compressor: the residual of each tensor covers this rank's shard; needs
            ``gtopk_hvd.tensorflow.init(hierarchical=True)`` before the compressor is made
            (it registers the node and rail sets, a collective).
    """

    def __init__(self, density=0.001, algorithm="gtopk", hierarchical=False):
        self.density = check_density(density)
        self.algorithm = check_algorithm(algorithm, where="Compression.gtopk")
        self._layout = None  # hierarchical gTop-k's layout (None: flat)
        if check_hierarchical(hierarchical, self.algorithm, "layer", is_elastic()):
            layout, _ = hierarchical_sets(hvd)  # collective: every rank makes its compressor
            self._layout = None if layout.mode == "flat" else layout
        self.hierarchical = hierarchical
        self._residuals = {}
        self._positions = weakref.WeakKeyDictionary()  # traced graph -> tensors seen

    @property
    def residuals(self):
        """{key: flat float32 tf.Variable}: this rank's residual of each tensor."""
        return dict(self._residuals)

    def _key(self, name):
        graph = _function_graph()
        if graph is None:  # eager: no trace to count positions in
            return require_name(name)
        position = self._positions.get(graph, 0)
        self._positions[graph] = position + 1
        return str(position) if name is None else str(name)

    def _residual(self, key, numel):
        eps = self._residuals.get(key)
        if eps is not None and eps.shape.num_elements() != numel:
            logger.warning("gtopk_hvd: compressed tensor %r changed size from %d to %d: its "
                           "residual starts again from zero", key, eps.shape.num_elements(),
                           numel)
            eps = None
        if eps is None:
            with tf.init_scope():
                eps = tf.Variable(tf.zeros([numel], tf.float32), trainable=False,
                                  name=f"gtopk_residual_{len(self._residuals)}")
            self._residuals[key] = eps
        return eps

    def compress(self, tensor):
        """This tensor's gTop-k step; a one-element placeholder and the ctx."""
        check_tf2_context("Compression.gtopk")
        name, op, process_set = horovod_call(self)
        check_compressor_process_set(process_set)
        if isinstance(tensor, tf.IndexedSlices):
            raise ValueError("the gTop-k compressor needs dense gradients: pass "
                             "sparse_as_dense=True to Horovod's tape or optimizer")
        if not tensor.dtype.is_floating:
            raise ValueError(f"the gTop-k compressor reduces floating-point gradients, got "
                             f"{tensor.dtype.name}")
        op = op_from_call(op, "Average", op_name)
        key = self._key(name)
        if tensor.shape.num_elements() is None:  # a densified IndexedSlices in a graph
            raise ValueError(
                f"the gTop-k compressor keeps a residual per tensor, so it needs gradients of "
                f"static shape; {key!r} has shape {tensor.shape} (sparse_as_dense=True on an "
                f"embedding inside tf.function gives one): use "
                f"gtopk_hvd.tensorflow.keras.DistributedOptimizer(..., sparse_as_dense=True) "
                f"or gtopk_hvd.tensorflow.DistributedGradientTape, which take the shape from "
                f"the variable")
        numel = check_buffer_numel(tensor.shape.num_elements(), key)
        lo, hi = (0, numel) if self._layout is None else self._layout.shard(numel, hvd.rank())
        eps = self._residual(key, hi - lo)  # hierarchical: this rank's shard
        result = gtopk_allreduce(tensor, self.density, name=f"{COMPRESSOR_PREFIX}.{key}",
                                 op=getattr(hvd, op), algorithm=self.algorithm,
                                 residual=eps.read_value(), hierarchical=self.hierarchical)
        update = eps.assign(result.residual)
        return zeros([1], tensor.dtype), (result.output, update)

    def decompress(self, tensor, ctx):
        """The dense gTop-k result, after the placeholder's allreduce and the residual update."""
        if ctx is None or not isinstance(ctx, tuple):
            return tensor
        output, update = ctx
        if tf.executing_eagerly():
            return output
        with tf.control_dependencies([tensor, update]):
            return tf.identity(output)

    def gtopk_stats(self):
        """density, algorithm, and the L2 norm of this rank's residuals."""
        norm = sum(float(tf.reduce_sum(tf.square(tf.cast(e, tf.float64))))
                   for e in self._residuals.values()) ** 0.5
        return {"density": self.density, "algorithm": self.algorithm, "residual_norm": norm}

    def __repr__(self):
        return (f"Compression.gtopk(density={self.density}, algorithm={self.algorithm!r}"
                f"{', hierarchical=True' if self.hierarchical else ''})")


class Compression(_HorovodCompression):
    """Horovod's ``Compression`` (``none``, ``fp16``) plus ``gtopk``.

    ``Compression.gtopk(density=0.01)`` is a new compressor: use one per tape or optimizer
    (it keeps their residuals).
    """

    gtopk = GTopkCompressor
