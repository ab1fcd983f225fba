"""The real Horovod jobs several test modules share, each launched once per pytest session
(on first use) and its per-rank records kept: one interpreter start per framework and world
size instead of one per module (the launches carry most of the suite's time on 2 cores)."""
import functools

from tests.harness import horovodrun


ROBUSTNESS_IN_TORCH_JOB = {3}  # the world sizes whose torch job runs robustness_worker.py
PARITY_IN_TORCH_JOB = {2, 3}  # ... and horovod_parity_worker.py (Horovod's own tests)


@functools.lru_cache(maxsize=None)
def torch_job(np_):
    """workers/torch_worker.py at ``np_`` ranks: the collective, optimizer, Compressor and
    plain-init scenarios, the cross-framework cases, at 3 ranks the robustness ones and at
    2 and 3 the re-written Horovod tests."""
    return horovodrun(np_, "tests/torch/workers/torch_worker.py",
                      *(["--robustness"] if np_ in ROBUSTNESS_IN_TORCH_JOB else []),
                      *(["--parity"] if np_ in PARITY_IN_TORCH_JOB else []))



@functools.lru_cache(maxsize=None)
def tensorflow_job_p3():
    """workers/tf_worker.py's ``world`` part at 3 ranks: the tape's reference comparisons,
    the cross-framework cases and the world-size robustness scenarios, ending with Horovod's
    own shutdown."""
    return horovodrun(3, "tests/tensorflow/workers/tf_worker.py", "world")


@functools.lru_cache(maxsize=None)
def tensorflow_job_p2():
    """workers/tf_worker.py's ``own`` part at 2 ranks: the other training scenarios and the
    loss-scaling ones (each rank's own arithmetic)."""
    return horovodrun(2, "tests/tensorflow/workers/tf_worker.py", "own")
