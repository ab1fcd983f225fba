"""Worker: the same gTop-k inputs through gtopk_hvd.tensorflow or gtopk_hvd.torch.

``crossframework_worker.py tensorflow`` or ``... torch``: every rank runs the same cases (inputs
from seeds, as in the other workers) and records what the collective returned as NumPy arrays;
tests/tensorflow/test_tf_cross_framework.py runs it once per framework and compares the two
recordings bit for bit.
"""
import os
import sys

from _common import rank_array

from tests.harness import Recorder

CASES = [  # name, seed, d, density, integer inputs, algorithm
    ("gtopk_random", 1, 1000, 0.01, False, "gtopk"),
    ("gtopk_ties", 2, 2000, 0.02, True, "gtopk"),
    ("gtopk_large_fast_path", 3, 300_000, 0.001, True, "gtopk"),
    ("gtopk_density_one", 4, 300, 1.0, False, "gtopk"),
    ("topk_random", 5, 1200, 0.01, False, "topk"),
]
FIELDS = ("output", "residual", "values", "indices", "local_indices", "alive")


def main():
    framework = sys.argv[1]
    if framework == "torch":
        import torch
        torch.set_num_threads(1)
        import gtopk_hvd.torch as hvd

        def as_input(a):
            return torch.from_numpy(a)

        def as_numpy(t):
            return t.detach().cpu().numpy()
    else:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(1)
        import gtopk_hvd.tensorflow as hvd

        def as_input(a):
            return tf.constant(a)

        def as_numpy(t):
            return t.numpy()
    hvd.init()
    rank = hvd.rank()
    rec = Recorder(rank)
    for name, seed, d, density, integer, algorithm in CASES:
        with rec(name) as data:
            x = rank_array(seed, rank, d, integer=integer, low=-20, high=21)
            res = hvd.gtopk_allreduce(as_input(x), density=density, name=f"x.{name}",
                                      algorithm=algorithm)
            for field in FIELDS:
                data[field] = as_numpy(getattr(res, field))
            data["k"], data["bytes_sent"] = int(res.k), int(res.bytes_sent)
    rec.save()
    hvd.shutdown()  # both backends' shutdown waits for every rank


if __name__ == "__main__":
    main()
