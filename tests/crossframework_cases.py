"""The cases both backends run on the same inputs, recorded so that
tests/tensorflow/test_tf_cross_framework.py can compare them bit for bit: the torch job
(tests/torch/workers/torch_worker.py) and the TensorFlow job at P = 3
(tests/tensorflow/workers/tf_worker.py) each call :func:`record` (records
``crossframework_<case>``).
"""
import numpy as np

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
            rng = np.random.default_rng([seed, rank])  # the workers' rank_array
            x = (rng.integers(-20, 21, d) if integer else rng.standard_normal(d))
            res = hvd.gtopk_allreduce(as_input(x.astype(np.float32)), density=density,
                                      name=f"x.{name}", algorithm=algorithm)
            for field in FIELDS:
                data[field] = as_numpy(getattr(res, field))
            data["k"], data["bytes_sent"] = int(res.k), int(res.bytes_sent)
