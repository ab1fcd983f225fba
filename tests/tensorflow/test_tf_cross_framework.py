"""The TensorFlow and PyTorch backends return the same bits for the same inputs.

The same cases (tests/crossframework_cases.py, inputs from seeds) run in the TensorFlow job at
P = 3 (fold / unfold included; workers/tf_worker.py) and in the torch job at P = 3
(tests/torch/workers/torch_worker.py), both shared with other modules through tests/jobs.py;
every rank's global set, dense output, residual, local set and alive flags must agree bit for
bit.
"""
import numpy as np
import pytest

from tests import jobs
from tests.crossframework_cases import CASES, FIELDS
from tests.harness import check_scenario

pytest.importorskip("torch")


def _bits(array):
    array = np.ascontiguousarray(array)
    return array.view(np.uint32) if array.dtype == np.float32 else array


@pytest.mark.parametrize("case", [name for name, *_ in CASES])
def test_tensorflow_and_torch_agree_bit_for_bit(case):
    tf_records = check_scenario(jobs.tensorflow_job_p3(), f"crossframework_{case}")
    torch_records = check_scenario(jobs.torch_job(3), f"crossframework_{case}")
    for rank, (a, b) in enumerate(zip(tf_records, torch_records)):
        assert (a["k"], a["bytes_sent"]) == (b["k"], b["bytes_sent"]), f"rank {rank}"
        for field in FIELDS:
            x, y = np.asarray(a[field]), np.asarray(b[field])
            assert x.dtype == y.dtype and x.shape == y.shape, (rank, field, x.dtype, y.dtype,
                                                               x.shape, y.shape)
            assert np.array_equal(_bits(x), _bits(y)), f"rank {rank}: {field} differs"
