"""The two TensorFlow test jobs of ``make test`` (tests/jobs.py), each one ``horovodrun``:

- ``world`` at P = 3 (a fold group and a hypercube stage): the scenarios whose subject is the
  world size: the tape's reference comparisons (training_worker.EXCHANGE_SHAPE), the
  cross-framework cases (tests/crossframework_cases.py) and robustness_worker.WORLD_SIZE;
  it ends with Horovod's own shutdown (no barrier);
- ``own`` at P = 2 (a core per rank): each rank's own arithmetic around the same step:
  training_worker.OTHERS (checkpoints, Keras, the Compressor, ``auto``, ...) and
  robustness_worker.OWN_ARITHMETIC (loss scaling, mixed_float16); it ends with gtopk_hvd's
  shutdown (after a barrier).

The ``own`` part also runs Horovod's own tape and Keras tests re-written for gTop-k
(horovod_parity_worker.py); the ``world`` part too under ``make test-stress``
(GTOPK_TEST_STRESS: 30 s more at P = 3; the torch job runs its parity scenarios at P = 3 in
``make test``).
"""
import os
import sys

import horovod.tensorflow as plain_hvd
import horovod_parity_worker
import robustness_worker
import training_worker
from _common import finish, start

from tests import crossframework_cases


def main(part):
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    if part == "world":
        for scenario in training_worker.EXCHANGE_SHAPE:
            scenario(tf, hvd, rec, rank, size)
        crossframework_cases.record(hvd, rec, rank, tf.constant, lambda t: t.numpy())
        parity = horovod_parity_worker.SCENARIOS if os.environ.get("GTOPK_TEST_STRESS") else ()
        for scenario in robustness_worker.WORLD_SIZE + parity:
            scenario(tf, hvd, rec, rank, size)
        rec.save()
        plain_hvd.shutdown()  # Horovod's own, no barrier
    else:
        for scenario in (training_worker.OTHERS + robustness_worker.OWN_ARITHMETIC
                         + horovod_parity_worker.SCENARIOS):
            scenario(tf, hvd, rec, rank, size)
        finish(tf, hvd, rec)


if __name__ == "__main__":
    main(sys.argv[1])
