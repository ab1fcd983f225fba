"""Horovod Elastic with gTop-k for Keras: ``run``, ``KerasState`` and the callbacks of
``horovod.tensorflow.keras.elastic``.

What gTop-k adds to a reset (a worker joins or leaves), as in gtopk_hvd.torch.elastic:

- Horovod restarts with gtopk_hvd's ``init`` and the Keras functions are traced again (a
  traced step holds the world size, this rank and the exchange process sets), so the
  exchange process sets are registered for the new world at the first step after the
  reset, where every rank is;
- residuals stay with the process: the state sync broadcasts the model, the optimizer's own
  variables and the gTop-k schedule step from rank 0, never the residuals, so the ranks
  that stay keep theirs and a new rank starts from zero; ``state.restore()`` after a failure
  gives a rank back its own residuals of the last commit.

Example (as Horovod's)::

    import gtopk_hvd.tensorflow.keras as hvd
    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(opt, density=0.01), loss=...)
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)

    @hvd.elastic.run
    def train(state):
        model.fit(..., initial_epoch=state.epoch, callbacks=[
            hvd.elastic.CommitStateCallback(state), hvd.elastic.UpdateBatchStateCallback(state),
            hvd.elastic.UpdateEpochStateCallback(state)])
    train(state)

A custom loop with ``DistributedGradientTape`` inside a ``tf.function`` must build that
function again after a reset: ``state.register_reset_callbacks([make_train_step])``.
"""
import tensorflow as tf
from horovod.tensorflow import broadcast_object
from horovod.tensorflow.elastic import TensorFlowKerasState
from horovod.tensorflow.keras.elastic import (CommitStateCallback, UpdateBatchStateCallback,
                                              UpdateEpochStateCallback)

from gtopk_hvd._keras import find_gtopk_state
from gtopk_hvd.tensorflow.elastic import run

__all__ = ["run", "KerasState", "CommitStateCallback", "UpdateBatchStateCallback",
           "UpdateEpochStateCallback"]

def _build_optimizer(optimizer, variables):
    """Create the optimizer's variables (``iterations`` and slots) if it has none yet."""
    if hasattr(optimizer, "_create_all_weights"):  # tf.keras.optimizers.legacy
        optimizer._create_all_weights(variables)
    elif not getattr(optimizer, "_built", False):  # as apply_gradients builds it
        with tf.name_scope(optimizer.name), tf.init_scope():
            optimizer.build(variables)


class KerasState(TensorFlowKerasState):
    """Horovod's ``KerasState`` for a model compiled with a gTop-k ``DistributedOptimizer``.

    Args:
        model: the Keras model (built).
        optimizer: the optimizer, if not compiled into the model: a gTop-k one (its
            schedule step is synchronised, its residuals kept per rank) or any other, which
            is handled as Horovod's ``KerasState`` handles it.
        kwargs: more properties to synchronise (``epoch``, ``batch``, ...).
    """

    def __init__(self, model, optimizer=None, **kwargs):
        self._gtopk = find_gtopk_state(optimizer or model.optimizer, required=False)
        self._saved_residuals = []
        super().__init__(model, optimizer=optimizer, backend=tf.keras.backend, **kwargs)

    def sync(self):
        """Rank 0's model, optimizer variables and schedule step; residuals stay.

        The optimizer is built first on every rank: a worker that just joined has not taken a
        step, so its optimizer would hold fewer variables (no ``iterations``, no slots) than
        the others', and the broadcast of the two lists would never match (Horovod's own
        KerasState waits forever there)."""
        _build_optimizer(self.optimizer, self.model.trainable_variables)
        super().sync()
        if self._gtopk is not None:
            self._gtopk._step.assign(int(broadcast_object(self._gtopk.step, root_rank=0)))

    def reset(self):
        """After Horovod restarted: trace the Keras functions again for the new world."""
        for attr in ("train_function", "test_function", "predict_function"):
            if getattr(self.model, attr, None) is not None:
                setattr(self.model, attr, None)

    def _save_model(self):
        super()._save_model()
        if getattr(self, "_gtopk", None) is not None:  # residuals, shards, carries
            self._saved_residuals = {eps.ref(): tf.identity(eps) for eps in
                                     self._gtopk.held_variables(with_flags=True)}
            self._saved_placements = dict(self._gtopk._book.placements)
            self._saved_step = self._gtopk.step

    def _load_model(self):
        super()._load_model()
        if self._gtopk is not None:
            for eps in self._gtopk.held_variables(with_flags=True):  # one made since: empty
                saved = self._saved_residuals.get(eps.ref())
                eps.assign(tf.zeros_like(eps) if saved is None else saved)
            self._gtopk._book.placements = dict(self._saved_placements)
            self._gtopk._step.assign(self._saved_step)
