"""First-step cost of Horovod's own TensorFlow tape with ``gtopk_hvd``'s Compressor.

Horovod's ``DistributedGradientTape`` calls the Compressor once per gradient, so
``Compression.gtopk`` traces one gTop-k exchange per variable into the ``tf.function`` that
Horovod builds for its allreduce (eagerly too).  The script times the first eager step (trace
and run) and the median of the next ones with ``Compression.none`` and ``Compression.gtopk``
side by side, each (method, variable count) in a fresh single-rank process (no horovodrun:
the tracing is each rank's own work), the model a stack of (40, 12) weights and (12,)
biases::

    python benchmarks/bench_tf_compressor_trace.py --variables 4,16,32

Prints a Markdown table; ``--out FILE`` writes it too.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(method, n):
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import numpy as np
    import tensorflow as tf

    import horovod.tensorflow as horovod_tf
    import gtopk_hvd.tensorflow as gtopk

    tf.config.threading.set_intra_op_parallelism_threads(1)
    gtopk.init()
    shapes = [(40, 12), (12,)] * (n // 2)
    variables = [tf.Variable(tf.zeros(s)) for s in shapes]
    compression = gtopk.Compression.gtopk(density=0.05) if method == "gtopk" \
        else horovod_tf.Compression.none
    rng = np.random.default_rng(0)
    times = []
    for _ in range(6):
        grads = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        start = time.perf_counter()
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
        tape = horovod_tf.DistributedGradientTape(tape, compression=compression)
        [g.numpy() for g in tape.gradient(loss, variables)]
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "step_ms": statistics.median(times[1:]) * 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variables", default="4,16,32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rows = ["| variables | Compressor | first step s | next steps ms | first step vs none |",
            "|---|---|---|---|---|"]
    for n in [int(v) for v in args.variables.split(",")]:
        got = {}
        for method in ("none", "gtopk"):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            got[method] = json.loads(out.strip().splitlines()[-1])
        for method in ("none", "gtopk"):
            r = got[method]
            rows.append(f"| {n} | {method} | {r['first_s']:.2f} | {r['step_ms']:.1f} | "
                        f"{r['first_s'] / got['none']['first_s']:.2f}x |")
    text = "\n".join([f"One rank, 1 intra-op thread, density 0.05, {os.cpu_count()} cores; "
                      "each row a fresh process.", ""] + rows)
    print(text)
    if args.out:
        Path(args.out).write_text("# Horovod's TensorFlow tape with the gTop-k Compressor: "
                                  "the first step\n\n`python benchmarks/"
                                  "bench_tf_compressor_trace.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
