"""Tracing cost of a TensorFlow step at ``granularity="layer"``: the segmented operations
against one merge per variable, side by side in one job.

A ``tf.function`` that takes the gradients of N variables through
``gtopk_hvd.tensorflow.DistributedGradientTape(granularity="layer")`` is traced, called once
(TensorFlow optimises the graph on the first call) and then timed, for:

- ``segmented``: the library's behaviour: the local selections of the small variables, every
  stage's merges and the alive checks done for all variables in one set of operations
  (``select_topk_many``, ``merge_truncate_many``, ``isin_many`` of gtopk_hvd.tensorflow.ops);
- ``per_variable``: the same exchange with one selection, merge and check per variable (the
  library's behaviour before: the traced step grows with the number of variables).

Both give the same results bit for bit (tests/tensorflow/test_tf_ops.py).  Launch it with
horovodrun::

    horovodrun -np 2 -H localhost:2 python benchmarks/bench_tf_trace.py --variables 4,16,40

Rank 0 prints, per method and variable count: the operations in the traced graph, the
seconds to trace, the first call, and the median step (milliseconds) of the slowest rank;
with ``--out FILE`` also as Markdown.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gtopk_hvd.tensorflow as hvd  # noqa: E402
from gtopk_hvd.tensorflow import ops  # noqa: E402

SEGMENTED = (ops.TFOps.select_topk_many, ops.TFOps.merge_truncate_many, ops.TFOps.isin_many)


def per_variable(on):
    """Switch TFOps to one operation per variable (``on``) or back to the segmented forms."""
    if on:
        ops.TFOps.select_topk_many = lambda self, accs, ks: [ops.select_topk(a, k)
                                                             for a, k in zip(accs, ks)]
        ops.TFOps.merge_truncate_many = lambda self, lows, highs, ks: [
            ops.merge_truncate(lo, hi, k) for lo, hi, k in zip(lows, highs, ks)]
        ops.TFOps.isin_many = lambda self, as_, bs: [ops.isin(a, b) for a, b in zip(as_, bs)]
    else:
        (ops.TFOps.select_topk_many, ops.TFOps.merge_truncate_many,
         ops.TFOps.isin_many) = SEGMENTED


def slowest(seconds):
    return float(hvd.allreduce(tf.constant([seconds], tf.float64), op=hvd.Max,
                               name="bench.max")[0])


def measure(n_vars, density, steps):
    shapes = [(64, 32) if j % 2 == 0 else (32,) for j in range(n_vars)]
    variables = [tf.Variable(tf.zeros(s)) for s in shapes]
    state = hvd.GTopkState(density, granularity="layer")

    @tf.function
    def step(grads):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
        return hvd.DistributedGradientTape(tape, gtopk_state=state).gradient(loss, variables)

    rng = np.random.default_rng(hvd.rank())
    grads = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    start = time.perf_counter()
    graph = step.get_concrete_function(grads).graph
    traced = time.perf_counter() - start
    start = time.perf_counter()
    step(grads)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        [g.numpy() for g in step(grads)]
        times.append(time.perf_counter() - start)
    return (len(graph.get_operations()), slowest(traced), slowest(first),
            1000 * slowest(statistics.median(times)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variables", default="4,16,40")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    hvd.init()
    rows = []
    for n_vars in [int(v) for v in args.variables.split(",")]:
        for method in ("segmented", "per_variable"):
            per_variable(method == "per_variable")
            rows.append((n_vars, method, *measure(n_vars, args.density, args.steps)))
    per_variable(False)
    if hvd.rank() == 0:
        cores = os.cpu_count()
        lines = [f"TensorFlow {tf.__version__}, {hvd.size()} ranks on {cores} cores, "
                 f"density {args.density}, `granularity=\"layer\"`, intra-op threads 1; "
                 "seconds and milliseconds of the slowest rank.", "",
                 "| variables | method | graph ops | trace s | first call s | step ms | "
                 "trace vs per_variable |", "|---|---|---|---|---|---|---|"]
        base = {r[0]: r for r in rows if r[1] == "per_variable"}
        for n_vars, method, n_ops, traced, first, step_ms in rows:
            lines.append(f"| {n_vars} | {method} | {n_ops} | {traced:.2f} | {first:.2f} | "
                         f"{step_ms:.1f} | {traced / base[n_vars][3]:.2f}x |")
        text = "\n".join(lines)
        print(text)
        if args.out:
            Path(args.out).write_text(f"# Tracing a layer-granularity TensorFlow step\n\n"
                                      f"`horovodrun -np {hvd.size()} python "
                                      f"benchmarks/bench_tf_trace.py`\n\n{text}\n")
    hvd.shutdown()


if __name__ == "__main__":
    main()
