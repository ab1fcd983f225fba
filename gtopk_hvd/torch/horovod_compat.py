"""What the PyTorch optimizer needs to behave under Horovod's own helper functions.

Horovod's ``broadcast_optimizer_state`` initialises an empty optimizer state by calling
``step()`` on zero gradients on the ranks without state only (the resume idiom: rank 0
loaded a checkpoint).  That step must not synchronise (the other ranks do not take it) and
must not move the parameters (weight decay would, on those ranks only).
:func:`called_by_horovod_state_init` recognises the call by walking the stack, and
:func:`state_init_step` takes it.
"""
import sys

import horovod.torch.functions
import torch

__all__ = ["called_by_horovod_state_init", "state_init_step"]

_HOROVOD_STATE_INIT = horovod.torch.functions.broadcast_optimizer_state.__code__


def called_by_horovod_state_init(depth=6):
    """Whether Horovod's ``broadcast_optimizer_state`` is among the ``depth`` callers above
    the caller."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is _HOROVOD_STATE_INIT:
            return True
        frame = frame.f_back
    return False


def state_init_step(optimizer, base_step):
    """The wrapped optimizer's step (``base_step()``) on the zero gradients Horovod set,
    without synchronising and with the parameters left bit for bit as they were: it only
    creates the optimizer state that the broadcast then overwrites."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    result = base_step()
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return result
