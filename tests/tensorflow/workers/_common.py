"""Helpers shared by the tensorflow worker scripts (run under horovodrun by tests/tensorflow).

Every rank generates every rank's inputs from seeds (the same generator as the torch workers,
so both frameworks see the same numbers), so each rank can run the NumPy reference of the
whole step on its own and assert against it without gathering.
"""
import logging
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import Recorder, rank_array  # noqa: E402,F401  (re-exported)


def start(**init):
    """Single-threaded TensorFlow, gtopk_hvd.tensorflow.init(**init); returns (tf, hvd,
    recorder)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.get_logger().setLevel("ERROR")
    import gtopk_hvd.tensorflow as hvd

    hvd.init(**init)
    return tf, hvd, Recorder(hvd.rank())


def finish(tf, hvd, rec):
    """Save this rank's records, then shut down once every rank got here (gtopk_hvd's
    shutdown waits: a rank that leaves early shuts Horovod down under the others, whose next
    op then fails with 'process set does not exist')."""
    rec.save()
    hvd.shutdown()


def to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def assert_equal(actual, expected, what):
    """Bitwise equality (NaN equals NaN, -0.0 equals 0.0) with a useful message."""
    a, e = to_numpy(actual), np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.dtype != e.dtype:
        a, e = a.astype(np.float64), e.astype(np.float64)
    mismatch = np.flatnonzero(~((a == e) | (np.isnan(a) & np.isnan(e))).reshape(-1))
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {a.size} entries differ, first at {mismatch[:5]}: "
        f"{a.reshape(-1)[mismatch[:5]]} != {e.reshape(-1)[mismatch[:5]]}")


def same_on_every_rank(tf, hvd, tensors, name):
    """True when every tensor of ``tensors`` is bitwise the same on every rank."""
    flat = tf.concat([tf.reshape(tf.bitcast(tf.cast(t, tf.float32), tf.int32), [-1])
                      for t in tensors], 0)
    rows = hvd.allgather(tf.expand_dims(flat, 0), name=name).numpy()
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
