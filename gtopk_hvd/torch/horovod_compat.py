"""Who calls the PyTorch optimizer's ``step()``: the callers it must recognise by walking the
stack, as Horovod's own optimizer cannot tell them apart either.

- Horovod's ``broadcast_optimizer_state`` initialises an empty optimizer state by calling
  ``step()`` on zero gradients on the ranks without state only (the resume idiom: rank 0
  loaded a checkpoint).  That step must not synchronise (the other ranks do not take it) and
  must not move the parameters (weight decay would, on those ranks only):
  :func:`called_by_horovod_state_init` recognises the call, :func:`state_init_step` takes it.
- torch's ``GradScaler.step(optimizer)``: :func:`calling_grad_scaler` finds the scaler, so
  that an optimizer built without ``grad_scaler=`` refuses to go on with residuals in scaled
  units.
"""
import sys

import horovod.torch.functions
import torch
from torch.amp.grad_scaler import GradScaler

__all__ = ["called_by_horovod_state_init", "state_init_step", "calling_grad_scaler"]

_HOROVOD_STATE_INIT = horovod.torch.functions.broadcast_optimizer_state.__code__
_SCALER_STEP = {GradScaler.step.__code__, GradScaler._maybe_opt_step.__code__}


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


def calling_grad_scaler(depth=4):
    """The enabled ``GradScaler`` whose ``step()`` is among the ``depth`` callers above the
    caller, or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code in _SCALER_STEP:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, GradScaler) and scaler.is_enabled() else None
        frame = frame.f_back
    return None
