"""Elastic Keras training with gTop-k under Horovod's elastic driver (horovodrun
--host-discovery-script).

Run by test_tf_elastic.py (through tests/elastic_harness.py), which grows the job from 2 to 3
workers and then kills the added one; with gtopk_hvd's ``hvd.elastic.run`` (second argument "gtopk").
``model.fit`` with Horovod's elastic callbacks (commit every batch) and a logging callback that
appends the events tests/elastic_harness.py checks to ``$GTOPK_ELASTIC_OUT/<pid>.jsonl``.
Batches are slowed down until the world shrinks (tests.elastic_harness.Pace), so that it
changes mid-run.
"""
import json
import os
import socket
import sys
import time
import zlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gtopk_hvd.tensorflow.keras as hvd  # noqa: E402
from gtopk_hvd.common import StepwiseDensity  # noqa: E402
from tests.elastic_harness import Pace  # noqa: E402

TOTAL_STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
OUT = os.environ["GTOPK_ELASTIC_OUT"]
PACE = Pace()  # one for the process: it remembers the largest world across resets
HIERARCHICAL = os.environ.get("GTOPK_TEST_HIERARCHICAL") == "1"


def log(**event):
    event.update(pid=os.getpid(), host=os.environ.get("HOROVOD_HOSTNAME", socket.gethostname()),
                 time=time.time())
    with open(os.path.join(OUT, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\n")


class LogSteps(tf.keras.callbacks.Callback):
    """Counts global steps in ``state.step`` (committed by CommitStateCallback after it) and
    logs each one; stops ``fit`` at TOTAL_STEPS."""

    def __init__(self, state, gtopk):
        super().__init__()
        self.state, self.gtopk = state, gtopk

    def on_train_batch_end(self, batch, logs=None):
        self.state.step += 1
        flat = tf.concat([tf.reshape(v, [-1]) for v in self.model.trainable_variables], 0)
        rows = hvd.allgather(tf.reshape(tf.bitcast(flat, tf.int32), [1, -1])).numpy()
        log(kind="step", size=hvd.size(), rank=hvd.rank(), batch=self.state.step,
            digest=zlib.crc32(flat.numpy().tobytes()), same=bool((rows == rows[0]).all()),
            gtopk_step=self.gtopk.step, residual_norm=self.gtopk.residual_norm() ** 2)
        PACE(hvd.size())


def main():
    tf.config.threading.set_intra_op_parallelism_threads(1)
    hvd.init(hierarchical=HIERARCHICAL)
    tf.keras.utils.set_random_seed(1234)  # the same start everywhere; the sync makes it so
    model = tf.keras.Sequential([tf.keras.layers.Dense(32, activation="tanh", input_shape=(16,)),
                                 tf.keras.layers.Dense(4)])
    opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.05),
                                   density=StepwiseDensity([0.2, 0.05], steps_per_epoch=10),
                                   hierarchical=HIERARCHICAL)
    model.compile(optimizer=opt, loss="mse")
    state = hvd.elastic.KerasState(model, step=0, batch=0, epoch=0)
    gtopk = opt.gtopk_state

    @hvd.elastic.run
    def train(state):
        log(kind="start", size=hvd.size(), rank=hvd.rank(), batch=state.step,
            gtopk_step=gtopk.step, residual_norm=gtopk.residual_norm() ** 2)
        rng = np.random.default_rng([state.step, hvd.rank()])
        x = rng.standard_normal((64, 16)).astype(np.float32)
        y = rng.standard_normal((64, 4)).astype(np.float32)
        data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)
        model.fit(data, steps_per_epoch=TOTAL_STEPS - state.step, epochs=1, verbose=0,
                  callbacks=[LogSteps(state, gtopk), hvd.elastic.CommitStateCallback(state),
                             hvd.elastic.UpdateBatchStateCallback(state),
                             hvd.elastic.UpdateEpochStateCallback(state)])
    train(state)
    log(kind="done", batch=state.step)


if __name__ == "__main__":
    main()
