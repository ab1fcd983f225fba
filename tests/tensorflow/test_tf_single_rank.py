"""One rank (plain ``python``, no horovodrun): with a float16 wire an own value beyond float16's
range makes the step non-finite there too, eagerly and in tf.function (no exchange happens,
so the verdict comes from the flags alone)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import numpy as np, tensorflow as tf
import gtopk_hvd.tensorflow as hvd
from gtopk_hvd.tensorflow.collective import exchange
hvd.init()
acc = tf.constant(np.arange(16, dtype=np.float32) * 7000.0)
graph = tf.function(lambda a, wire: exchange(a, 4, wire=wire).verdict)
print([int(exchange(acc, 4, wire=w).verdict) for w in ("float32", "float16")],
      [int(graph(acc, w)) for w in ("float32", "float16")])
"""


def test_float16_overflow_on_a_single_rank_is_nonfinite():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 1] [0, 1]", proc.stdout
