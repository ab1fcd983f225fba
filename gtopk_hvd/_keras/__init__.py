"""Keras integration of gTop-k, written once (as horovod/_keras is) and wrapped by
gtopk_hvd.tensorflow.keras.

:func:`create_distributed_optimizer` builds, like Horovod, a subclass of the user's optimizer
class (same name, so saved models load without gtopk_hvd) whose gradient computation ends with
the gTop-k reduction of gtopk_hvd.tensorflow.gradients.  It overrides the same methods as
Horovod's (``compute_gradients`` / ``_compute_gradients`` / ``get_gradients`` /
``apply_gradients``), so it serves both the tf.keras optimizers and their ``legacy`` versions.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.tensorflow.gradient_aggregation_eager import LocalGradientAggregationHelperEager

from gtopk_hvd.common.errors import GTopkError
from gtopk_hvd.tensorflow.gradients import allreduce_gradients

__all__ = ["create_distributed_optimizer", "check_tf_keras_optimizer", "find_gtopk_state",
           "load_model_with"]

logger = logging.getLogger(__name__)


def check_tf_keras_optimizer(optimizer):
    """Refuse anything but a tf.keras (tf-keras) optimizer, Keras 3 first and loudly: Horovod's
    own Keras wrapper silently skips the allreduce there, so training would run unsynchronised.
    """
    modules = [cls.__module__ or "" for cls in type(optimizer).__mro__]
    module = next((m for m in modules if m.split(".")[0] in ("keras", "tf_keras")),
                  modules[0])
    if module == "keras" or module.startswith("keras."):
        raise GTopkError(
            f"{type(optimizer).__name__} is a Keras 3 optimizer ({module}); gtopk_hvd (like "
            f"Horovod) supports tf.keras from the tf-keras package only, and would otherwise "
            f"train without synchronising. Fix: `pip install tf-keras`, set the environment "
            f"variable TF_USE_LEGACY_KERAS=1 before TensorFlow is imported, and build the model "
            f"and optimizer with tf.keras")
    if not module.startswith("tf_keras") or not hasattr(optimizer, "apply_gradients"):
        raise TypeError(
            f"optimizer must be a tf.keras optimizer (for example tf.keras.optimizers.SGD with "
            f"TF_USE_LEGACY_KERAS=1), got {type(optimizer).__name__} from {module!r}")


def find_gtopk_state(optimizer, required=True):
    """The GTopkState of a gTop-k optimizer, looking through wrappers (LossScaleOptimizer);
    None for another optimizer unless ``required``."""
    seen = 0
    while optimizer is not None and seen < 4:
        state = getattr(optimizer, "gtopk_state", None)
        if state is not None:
            return state
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    if not required:
        return None
    raise ValueError("the model's optimizer is not a gTop-k optimizer: wrap it with "
                     "gtopk_hvd.tensorflow.keras.DistributedOptimizer before model.compile()")


def create_distributed_optimizer(optimizer, name, sparse_as_dense, op,
                                 backward_passes_per_step, average_aggregated_gradients,
                                 scale_local_gradients, gtopk_state, reduction=None):
    class _DistributedOptimizer(*optimizer.__class__.__bases__):
        _HAS_AGGREGATE_GRAD = True

        def __init__(self, *args, **kwargs):
            super(self.__class__, self).__init__(*args, **kwargs)
            self._gtopk_name = name or "Distributed%s" % self.__class__.__base__.__name__
            self._gtopk = gtopk_state  # tracked: checkpoints hold the residuals
            self._local_vars = set()
            self.scale_local_gradients = scale_local_gradients
            self._agg_helper = None
            if backward_passes_per_step > 1:
                self._agg_helper = LocalGradientAggregationHelperEager(
                    backward_passes_per_step=backward_passes_per_step,
                    allreduce_func=self._gtopk_reduce,
                    sparse_as_dense=sparse_as_dense,
                    average_aggregated_gradients=average_aggregated_gradients,
                    scale_local_gradients=scale_local_gradients)

        @property
        def gtopk_state(self):
            """The :class:`~gtopk_hvd.tensorflow.GTopkState`: schedule, residuals, step."""
            return self._gtopk

        def gtopk_stats(self):
            """Statistics of the last synchronisation on this rank (GTopkState.gtopk_stats)."""
            return self._gtopk.gtopk_stats()

        def register_local_var(self, var):
            """Registers a variable as worker local: its gradient is not communicated (and
            divided by the world size when ``scale_local_gradients``), as in Horovod."""
            if self._agg_helper:
                self._agg_helper.register_local_var(var)
            else:
                self._local_vars.add(var.ref())

        @property
        def _gtopk_deferred(self):
            """Inside a LossScaleOptimizer (which ``mixed_float16`` compile adds), the
            gradients are reduced where it aggregates them, after it unscaled them, so the
            residuals stay in unscaled units and every rank sees the same verdict."""
            if not getattr(self, "_is_wrapped_by_loss_scale_optimizer", False):
                return False
            if self._agg_helper:
                raise GTopkError(
                    "backward_passes_per_step > 1 cannot be combined with a LossScaleOptimizer "
                    "around the gTop-k optimizer; wrap the other way round: "
                    "DistributedOptimizer(LossScaleOptimizer(opt), backward_passes_per_step=...)")
            return True

        @tf.autograph.experimental.do_not_convert
        def compute_gradients(self, loss, var_list, tape=None):
            return self._compute_gradients(loss, var_list, None, tape)

        @tf.autograph.experimental.do_not_convert
        def _compute_gradients(self, loss, var_list, grad_loss=None, tape=None):
            base_class = super(self.__class__, self)
            tape = tf.GradientTape() if tape is None else tape
            if hasattr(base_class, "_compute_gradients"):
                grads_and_vars = base_class._compute_gradients(loss, var_list, grad_loss,
                                                               tape=tape)
            else:
                grads_and_vars = base_class.compute_gradients(loss, var_list, tape=tape)
            grads, weights = list(zip(*grads_and_vars))
            return list(zip(self._allreduce(grads, weights), weights))

        @tf.autograph.experimental.do_not_convert
        def get_gradients(self, loss, params):
            gradients = super(self.__class__, self).get_gradients(loss, params)
            return self._allreduce(gradients, params)

        @tf.autograph.experimental.do_not_convert
        def _gtopk_reduce(self, grads, variables):
            return allreduce_gradients(self._gtopk, list(grads), list(variables), op=op,
                                       sparse_as_dense=sparse_as_dense, name=self._gtopk_name,
                                       optimizer=self, **(reduction or {}))

        @tf.autograph.experimental.do_not_convert
        def _allreduce(self, grads, variables):
            if self._gtopk_deferred:  # zeros, not None: the LossScaleOptimizer drops None
                return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
            return self._reduce_shared(grads, variables)

        @tf.autograph.experimental.do_not_convert
        def _reduce_shared(self, grads, variables):
            if self._agg_helper:
                return self._agg_helper.compute_gradients(tuple(grads), tuple(variables))
            grads, variables = list(grads), list(variables)
            shared = [i for i, v in enumerate(variables) if v.ref() not in self._local_vars]
            reduced = self._gtopk_reduce([grads[i] for i in shared],
                                         [variables[i] for i in shared])
            for i, grad in zip(shared, reduced):
                grads[i] = grad
            if self.scale_local_gradients and self._local_vars:
                for i, v in enumerate(variables):
                    if v.ref() in self._local_vars and grads[i] is not None:
                        grads[i] = grads[i] / hvd.size()
            return grads

        @tf.autograph.experimental.do_not_convert
        def _reduce_deferred(self, grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            if not self._gtopk_deferred or not grads_and_vars:
                return None
            grads, variables = zip(*grads_and_vars)
            return list(zip(self._reduce_shared(grads, variables), variables))

        def _aggregate_gradients(self, grads_and_vars):
            reduced = self._reduce_deferred(grads_and_vars)
            if reduced is not None:
                return reduced
            base_class = super(self.__class__, self)
            if hasattr(base_class, "_aggregate_gradients"):
                return base_class._aggregate_gradients(grads_and_vars)
            return base_class.aggregate_gradients(grads_and_vars)

        def aggregate_gradients(self, grads_and_vars):
            reduced = self._reduce_deferred(grads_and_vars)
            if reduced is not None:
                return reduced
            return super(self.__class__, self).aggregate_gradients(grads_and_vars)

        def apply_gradients(self, *args, **kwargs):
            if self._agg_helper:
                if isinstance(args[0], zip):
                    args = (list(args[0]),) + tuple(args[1:])
                return self._agg_helper.apply_gradients(
                    lambda: super(self.__class__, self).apply_gradients(*args, **kwargs),
                    self, *args, **kwargs)
            return super(self.__class__, self).apply_gradients(*args, **kwargs)

    # A subclass of the optimizer's own class with the same name, as Horovod builds it, so
    # that a saved model can be loaded without gtopk_hvd.
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    return cls.from_config(optimizer.get_config())


class _Rewrap:
    """Stands for an optimizer class while a model loads: builds the optimizer from its saved
    config, then wraps it (``wrap(optimizer)``)."""

    def __init__(self, cls, wrap):
        self.cls, self.wrap = cls, wrap
        self.__name__ = cls.__name__

    def __call__(self, *args, **kwargs):
        return self.wrap(self.cls(*args, **kwargs))

    def from_config(self, config, custom_objects=None):
        return self.wrap(self.cls.from_config(config))


def _optimizer_classes(base):
    found, todo = {}, list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("tf_keras.") and "mixed_precision" not in cls.__module__:
            found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def load_model_with(wrap, filepath, custom_optimizers, custom_objects, legacy_opts=False):
    """``tf.keras.models.load_model`` with every tf.keras optimizer class (and
    ``custom_optimizers``) standing for itself wrapped by ``wrap``: under its name and in lower
    case, as the .keras, .h5 and SavedModel formats look them up."""
    optimizers = tf.keras.optimizers
    classes = dict(_optimizer_classes(optimizers.legacy.Optimizer if legacy_opts
                                      else optimizers.Optimizer))
    classes.update({cls.__name__: cls for cls in custom_optimizers or ()})
    objects = {}
    for name, cls in classes.items():
        objects[name] = objects[name.lower()] = _Rewrap(cls, wrap)
    objects.update(custom_objects or {})
    return tf.keras.models.load_model(filepath, custom_objects=objects)
