"""The cases both backends run on the same inputs, recorded so that
tests/tensorflow/test_tf_cross_framework.py can compare them bit for bit: the torch job
(tests/torch/workers/torch_worker.py) and the TensorFlow job at P = 3
(tests/tensorflow/workers/tf_worker.py) each call :func:`record` (records
``crossframework_<case>``).
"""
from tests.harness import rank_array

CASES = [  # name, seed, d, density, integer inputs, algorithm
    ("gtopk_random", 1, 1000, 0.01, False, "gtopk"),
    ("gtopk_ties", 2, 2000, 0.02, True, "gtopk"),
    ("gtopk_large_fast_path", 3, 300_000, 0.001, True, "gtopk"),
    ("gtopk_density_one", 4, 300, 1.0, False, "gtopk"),
    ("topk_random", 5, 1200, 0.01, False, "topk"),
]
NAMES = [f"crossframework_{name}" for name, *_ in CASES]
FIELDS = ("output", "residual", "values", "indices", "local_indices", "alive")


def record(hvd, rec, rank, as_input, as_numpy):
    """Run every case through ``hvd.gtopk_allreduce`` (gtopk_hvd.torch or .tensorflow) and
    record what it returned as NumPy arrays."""
    for (name, seed, d, density, integer, algorithm), record_name in zip(CASES, NAMES):
        with rec(record_name) as data:
            x = rank_array(seed, rank, d, integer=integer, low=-20, high=21)
            res = hvd.gtopk_allreduce(as_input(x), density=density, name=f"x.{name}",
                                      algorithm=algorithm)
            for field in FIELDS:
                data[field] = as_numpy(getattr(res, field))
            data["k"], data["bytes_sent"] = int(res.k), int(res.bytes_sent)
