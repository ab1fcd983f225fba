"""``hvd.join()`` for gTop-k in TensorFlow: a rank that ran out of data takes part in the
others' steps with zeros until every rank has joined.

Every call of :func:`~gtopk_hvd.tensorflow.gradients.allreduce_gradients` (the tape, the
Keras optimizer) is remembered here, per :class:`~gtopk_hvd.tensorflow.state.GTopkState`:
its variables, its arguments, whether it ran eagerly or in a ``tf.function``, and the Keras
optimizer that applies it.  :func:`join` repeats the latest such call (or those of the
states it is given) with zeros, in the same mode, so the joined rank issues exactly the
operations the others issue.  In a ``tf.function`` the call is seen when it is traced, not at
every step, so "latest" means the last one run eagerly or traced.  The PyTorch counterpart is
gtopk_hvd.torch.functions.join.
"""
import weakref

import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.join import last_to_join, rounds_until_all_joined

__all__ = ["join", "remember"]

_CALLS = {}  # id(state) -> _Call, in the order the states were first used


class _Call:
    def __init__(self, state, variables, optimizer, eager, kwargs):
        self.state = weakref.ref(state)
        self.variables = [weakref.ref(v) for v in variables]
        self.optimizer = None if optimizer is None else weakref.ref(optimizer)
        self.eager, self.kwargs = eager, kwargs
        self.graph_step = None

    def alive(self):
        return self.state() is not None and all(v() is not None for v in self.variables)

    def joined_step(self):
        """One step of the others with zeros; whether every rank has joined."""
        from gtopk_hvd.tensorflow.gradients import allreduce_gradients
        state, variables = self.state(), [v() for v in self.variables]

        def step():
            return allreduce_gradients(state, [None] * len(variables), variables,
                                       joined=True, **self.kwargs)
        if self.eager:
            return bool(step())
        if self.graph_step is None:
            self.graph_step = tf.function(step, autograph=False)
        return bool(self.graph_step().numpy())


def remember(state, variables, optimizer, eager, kwargs):
    """Note a call of allreduce_gradients (at trace time in a ``tf.function``)."""
    _CALLS.pop(id(state), None)  # re-inserted: a state's place is that of its latest call
    _CALLS[id(state)] = _Call(state, variables, optimizer, eager, kwargs)


def join(gtopk_states=None):
    """``hvd.join()`` for gTop-k: call it on a rank that ran out of data; it returns once every
    rank has called it, with the rank that joined last, as Horovod's does.

    Until then this rank repeats, with zero gradients, the latest gTop-k reduction this
    process ran (the tape's or the Keras optimizer's, eagerly or in a ``tf.function`` as it
    ran; a program that steps several, say a GAN, passes their states in the order it steps
    them: ``gtopk_states=[tape_d.gtopk_state, tape_g.gtopk_state]``), so the others' steps
    give what they would give if it had contributed zeros; its residuals are kept for later.
    When every rank has joined, the ranks that joined early take the variables (and the Keras
    optimizer's variables) of the rank that joined last.  With a tape, broadcast your
    optimizer's variables yourself: ``hvd.broadcast_variables(opt.variables(),
    root_rank=last)``.  Between one rank's ``join()`` and the last one, the ranks still
    training issue no Horovod operation of their own; with no gTop-k reduction in this process
    this is Horovod's ``join``.
    """
    alive = {key: c for key, c in _CALLS.items() if c.alive()}
    if gtopk_states is not None:
        missing = [s for s in gtopk_states if id(s) not in alive]
        if missing:
            raise ValueError(
                f"join(gtopk_states=...): {len(missing)} of the states never ran a gTop-k "
                f"reduction on this rank, so there is no step to take part in; pass the "
                f"states of the tapes or optimizers this program steps")
        calls = [alive[id(s)] for s in gtopk_states]
    else:
        calls = list(alive.values())[-1:]
    if not calls:
        return hvd.join()
    rounds = rounds_until_all_joined([call.joined_step for call in calls])
    last, catch_up = last_to_join(hvd.allgather(tf.constant([rounds], tf.int64),
                                                name="gtopk.join.rounds").numpy())
    if catch_up:  # some ranks skipped steps: they take the last rank's variables
        for call in calls:
            variables = [v() for v in call.variables]
            optimizer = None if call.optimizer is None else call.optimizer()
            if optimizer is not None:
                variables += list(optimizer.variables())
            hvd.broadcast_variables(variables, root_rank=last)
    return last
