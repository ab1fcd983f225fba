"""Helpers shared by the torch worker scripts (run under horovodrun by tests/torch).

Every rank generates every rank's inputs from seeds, so each rank can run the NumPy
reference of the whole step on its own and assert against it without gathering.
"""
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import Recorder, rank_array  # noqa: E402,F401  (re-exported for the workers)


def assert_equal(actual, expected, what):
    """Bitwise equality of a torch tensor (or array) and a NumPy array, with a useful message."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.dtype != e.dtype:
        a, e = a.astype(np.float64), e.astype(np.float64)
    mismatch = np.flatnonzero(~((a == e) | (np.isnan(a) & np.isnan(e))).reshape(-1))
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {a.size} entries differ, first at {mismatch[:5]}: "
        f"{a.reshape(-1)[mismatch[:5]]} != {e.reshape(-1)[mismatch[:5]]}")


def same_on_every_rank(hvd, tensor, name):
    """True when ``tensor`` is bitwise the same on every rank (allgather, then compare)."""
    flat = tensor.detach().reshape(1, -1).to(torch.float32).contiguous()
    rows = hvd.allgather(flat.view(torch.int32), name=name)
    return bool((rows == rows[0]).all())


class LogCapture(logging.Handler):
    """Collects the messages of the gtopk_hvd loggers while installed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("gtopk_hvd").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("gtopk_hvd").removeHandler(self)
