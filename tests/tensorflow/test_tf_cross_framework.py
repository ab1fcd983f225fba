"""The TensorFlow and PyTorch backends return the same bits for the same inputs.

workers/crossframework_worker.py runs the same cases (inputs from seeds) once under
gtopk_hvd.tensorflow and once under gtopk_hvd.torch, at P = 3 (fold / unfold included); every
rank's global set, dense output, residual, local set and alive flags must agree bit for bit.
"""
import numpy as np
import pytest

from tests.harness import check_scenario, horovodrun

pytest.importorskip("torch")
WORKER = "tests/tensorflow/workers/crossframework_worker.py"
CASES = ["gtopk_random", "gtopk_ties", "gtopk_large_fast_path", "gtopk_density_one",
         "topk_random"]
FIELDS = ("output", "residual", "values", "indices", "local_indices", "alive")


@pytest.fixture(scope="module")
def recordings():
    return {framework: horovodrun(3, WORKER, framework) for framework in ("tensorflow", "torch")}


def _bits(array):
    array = np.ascontiguousarray(array)
    return array.view(np.uint32) if array.dtype == np.float32 else array


@pytest.mark.parametrize("case", CASES)
def test_tensorflow_and_torch_agree_bit_for_bit(recordings, case):
    tf_records = check_scenario(recordings["tensorflow"], case)
    torch_records = check_scenario(recordings["torch"], case)
    for rank, (a, b) in enumerate(zip(tf_records, torch_records)):
        assert (a["k"], a["bytes_sent"]) == (b["k"], b["bytes_sent"]), f"rank {rank}"
        for field in FIELDS:
            x, y = np.asarray(a[field]), np.asarray(b[field])
            assert x.dtype == y.dtype and x.shape == y.shape, (rank, field, x.dtype, y.dtype,
                                                               x.shape, y.shape)
            assert np.array_equal(_bits(x), _bits(y)), f"rank {rank}: {field} differs"
