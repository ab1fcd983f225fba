"""The PyTorch example as `make demo` runs it (one epoch, 2 ranks): it trains, and what a user
sees through horovodrun is clean: no TensorFlow start-up banners from horovodrun's build check
(Horovod patch in scripts/build_horovod.sh) and no progress-bar fragments (the bar is drawn on
rank 0 at a terminal only).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BANNERS = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "rebuild TensorFlow")


def test_demo_output_is_clean():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    env.update(TF_USE_LEGACY_KERAS="1", OMP_NUM_THREADS="1")
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "horovodrun"), "-np", "2", "-H", "localhost:2", str(sys.executable),
         "examples/pytorch_mnist1d.py", "--epochs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "final test accuracy" in output, output[-3000:]
    for banner in BANNERS:
        assert banner not in output, f"{banner!r} in the demo's output:\n{output[:3000]}"
    assert "<stderr>:[0]<stderr>" not in output and "it/s]" not in output, output[-3000:]
