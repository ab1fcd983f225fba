"""Under Keras 3 (TensorFlow 2.16+ without TF_USE_LEGACY_KERAS=1), where Horovod's Keras
wrapper silently skips communication, the gTop-k DistributedOptimizer refuses to be built and
says how to fix it.  Run in a subprocess: the flag is read when TensorFlow is imported."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import tensorflow as tf
import keras
assert keras.__version__.startswith("3"), keras.__version__
import gtopk_hvd.tensorflow.keras as hvd
from gtopk_hvd.common.errors import GTopkError
for optimizer in (tf.keras.optimizers.SGD(0.1), keras.optimizers.Adam()):
    try:
        hvd.DistributedOptimizer(optimizer, density=0.01)
    except GTopkError as exc:
        print("REFUSED:", exc)
    else:
        raise SystemExit("a Keras 3 optimizer was accepted")
"""


def test_keras3_optimizer_is_refused_with_the_fix_in_the_message():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refusals = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(refusals) == 2, proc.stdout
    for line in refusals:
        assert "Keras 3" in line and "TF_USE_LEGACY_KERAS=1" in line, line
