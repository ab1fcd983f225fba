"""The TensorFlow test job at P = 3 (a fold group and a hypercube stage): the tape's reference
comparisons of training_worker.py (``EXCHANGE_SHAPE``), the cross-framework cases
(tests/crossframework_cases.py) and every scenario of robustness_worker.py, in one
``horovodrun -np 3`` (tests/jobs.py), ending with Horovod's own shutdown (no barrier).
"""
import horovod.tensorflow as plain_hvd
import robustness_worker
import training_worker
from _common import start

from tests import crossframework_cases


def main():
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    for scenario in training_worker.EXCHANGE_SHAPE:
        scenario(tf, hvd, rec, rank, size)
    crossframework_cases.record(hvd, rec, rank, tf.constant, lambda t: t.numpy())
    for scenario in robustness_worker.WORLD_SIZE + robustness_worker.OWN_ARITHMETIC:
        scenario(tf, hvd, rec, rank, size)
    rec.save()
    plain_hvd.shutdown()  # Horovod's own, no barrier


if __name__ == "__main__":
    main()
