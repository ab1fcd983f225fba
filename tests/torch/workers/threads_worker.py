"""Intra-op threads after gtopk_hvd's init() (run by tests/test_threads_policy.py).

``python tests/torch/workers/threads_worker.py torch|tf [JSON]`` under horovodrun: records the
framework's intra-op threads before and after ``init()`` and the host's cores.  JSON maps a
rank to environment variables that this rank sets before it imports the framework, as if it
had been started with them: one job tries several settings side by side.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from gtopk_hvd.common.threads import host_cores  # noqa: E402
from tests.harness import Recorder  # noqa: E402


def main(framework, per_rank="{}"):
    os.environ.update(json.loads(per_rank).get(os.environ.get("HOROVOD_RANK", "0"), {}))
    if framework == "torch":
        import torch

        import gtopk_hvd.torch as hvd
        before = torch.get_num_threads()
        hvd.init()
        after = torch.get_num_threads()
    else:
        import tensorflow as tf

        import gtopk_hvd.tensorflow as hvd
        before = tf.config.threading.get_intra_op_parallelism_threads() or host_cores()
        hvd.init()
        after = tf.config.threading.get_intra_op_parallelism_threads() or host_cores()
    rec = Recorder(hvd.rank())
    with rec("threads") as data:
        data.update(before=before, after=after, cores=host_cores(),
                    local_size=hvd.local_size())
    rec.save()
    hvd.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
