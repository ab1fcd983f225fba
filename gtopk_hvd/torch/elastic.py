"""Horovod Elastic with gTop-k: ``hvd.elastic.run``, ``TorchState`` and ``ElasticSampler``
as in ``horovod.torch.elastic``.

What gTop-k adds to a reset (a worker joins or leaves):

- the exchange process sets are registered again for the new world, at the first gTop-k
  exchange after the reset, where every rank is (never while a joining worker builds its
  optimizer and the others synchronise their state: that deadlocked);
- residuals stay with the process: a state sync broadcasts parameters and the optimizer state
  from rank 0 but never the residuals, so the ranks that stay keep theirs and a new rank
  starts from zero; ``state.restore()`` after a failure gives a rank back its own residuals of
  the last commit;
- the schedule step comes from rank 0 with the optimizer state (``broadcast_optimizer_state``).

Example (as Horovod's)::

    import gtopk_hvd.torch as hvd
    hvd.init()
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), density=0.01)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            ...
            state.commit()
    train(state)
"""
from horovod.common.elastic import run_fn
from horovod.torch import shutdown
from horovod.torch.elastic import ElasticSampler, TorchState

from gtopk_hvd.torch.functions import init

__all__ = ["run", "TorchState", "ElasticSampler"]


def run(func):
    """Decorator that runs ``func(state, ...)`` elastically, as ``horovod.torch.elastic.run``:
    on a reset Horovod restarts with the new world (``gtopk_hvd.torch.init``), the state is
    synchronised from rank 0 and ``func`` runs again."""
    return run_fn(func, _reset)


def _reset():
    shutdown()
    init()
