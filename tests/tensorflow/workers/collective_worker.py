"""Worker: gtopk_hvd.tensorflow.gtopk_allreduce on every rank against the NumPy reference,
eagerly and inside tf.function.

Run by tests/tensorflow/test_tf_collective.py under ``horovodrun -np N``; each scenario asserts
on this rank and is recorded with tests.harness.Recorder.  Every scenario communicates first
and asserts afterwards, so a failing rank never leaves the others waiting in a collective.
"""
import numpy as np
from _common import assert_equal, finish, rank_array, same_on_every_rank, start

from gtopk_hvd.common import k_for
from gtopk_hvd.common.collective import gtopk_wire_bytes, topk_wire_bytes
from gtopk_hvd.common.reference import gtopk_step, topk_allgather_step

MODES = ("eager", "graph")


def run(tf, hvd, mode, x, **kwargs):
    """gtopk_allreduce eagerly or in a fresh tf.function; returns NumPy arrays."""
    def call(x):
        res = hvd.gtopk_allreduce(x, **kwargs)
        return {"output": res.output, "residual": res.residual, "values": res.values,
                "indices": res.indices, "local_indices": res.local_indices,
                "alive": res.alive, "bytes_sent": res.bytes_sent}
    out = (tf.function(call) if mode == "graph" else call)(tf.constant(x))
    return {key: np.asarray(value) for key, value in out.items()}


def check_against_reference(res, want, size, rank, average=True):
    """The full contract of one call: global set, dense output, local set, alive, residual."""
    d = res["residual"].size
    assert_equal(res["indices"], want.indices.astype(np.int32), "global indices")
    assert_equal(res["values"], want.values, "global values")
    assert_equal(res["local_indices"], want.local_indices[rank].astype(np.int32), "local indices")
    assert_equal(res["alive"], want.alive[rank], "alive flags")
    assert_equal(res["residual"], want.residuals[rank], "residual")
    assert_equal(res["output"].reshape(-1), want.dense(d, average_over=size if average else 1),
                 "dense output")


def gtopk_random(tf, hvd, rec, rank, size):
    for mode in MODES:
        for seed, d, density, shape in [(1, 1000, 0.01, (1000,)), (2, 4096, 0.003, (64, 64)),
                                        (3, 777, 0.1, (7, 111)), (4, 50, 0.5, (50,))]:
            with rec(f"gtopk_random_d{d}_density{density}_{mode}_equals_reference") as data:
                accs = [rank_array(seed, p, d) for p in range(size)]
                res = run(tf, hvd, mode, accs[rank].reshape(shape), density=density,
                          name=f"rand{seed}")
                same = same_on_every_rank(tf, hvd, [res["output"]], f"same{seed}{mode}")
                assert res["output"].shape == shape
                check_against_reference(res, gtopk_step(accs, k_for(d, density)), size, rank)
                assert same, "the output differs between ranks"
                data["k"] = k_for(d, density)


def gtopk_ties(tf, hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"gtopk_heavy_ties_integer_valued_{mode}_equals_reference"):
            d, density = 2000, 0.02
            accs = [rank_array(10, p, d, integer=True) for p in range(size)]
            res = run(tf, hvd, mode, accs[rank], density=density, name="ties")
            check_against_reference(res, gtopk_step(accs, k_for(d, density)), size, rank)
    with rec("gtopk_all_zero_input_selects_lowest_indices"):
        d = 300
        accs = [np.zeros(d, np.float32) for _ in range(size)]
        res = run(tf, hvd, "graph", accs[rank], density=0.01, name="zeros")
        check_against_reference(res, gtopk_step(accs, 3), size, rank)
        assert res["indices"].tolist() == [0, 1, 2], res["indices"]


def gtopk_large_fast_path(tf, hvd, rec, rank, size):
    """Buffers above 2^18 elements go through the threshold-estimate selection."""
    for seed, integer, mode in [(20, False, "eager"), (21, True, "graph")]:
        with rec(f"gtopk_large_buffer_{'ties' if integer else 'random'}_{mode}_equals_reference"):
            d, density = 300_000, 0.001
            accs = [rank_array(seed, p, d, integer=integer, low=-20, high=21)
                    for p in range(size)]
            res = run(tf, hvd, mode, accs[rank], density=density, name=f"large{seed}")
            check_against_reference(res, gtopk_step(accs, k_for(d, density)), size, rank)


def gtopk_residual_feedback(tf, hvd, rec, rank, size):
    with rec("gtopk_three_steps_with_residual_in_one_tf_function_equal_reference_iterated"):
        d, k = 500, 10
        step = tf.function(lambda g, eps: (lambda r: (r.output, r.residual))(
            hvd.gtopk_allreduce(g, density=k / d, name="feedback", residual=eps)))
        results, residual = [], tf.zeros([d])
        for t in range(3):
            results.append(step(tf.constant(rank_array(30 + t, rank, d)), residual))
            residual = results[-1][1]
        eps_ref = [np.zeros(d, np.float32) for _ in range(size)]
        for t, (output, eps) in enumerate(results):
            grads = [rank_array(30 + t, p, d) for p in range(size)]
            want = gtopk_step([g + e for g, e in zip(grads, eps_ref)], k)
            assert_equal(output, want.dense(d, average_over=size), f"output of step {t}")
            assert_equal(eps, want.residuals[rank], f"residual of step {t}")
            eps_ref = want.residuals
        assert float(tf.reduce_sum(tf.abs(residual))) > 0, "the residual carries unsent mass"


def gtopk_two_buffers_in_one_graph(tf, hvd, rec, rank, size):
    with rec("gtopk_two_independent_buffers_in_one_tf_function_equal_reference"):
        # nothing orders the two collectives inside the graph: they run concurrently
        shapes = [(600,), (30, 20)]
        accs = [[rank_array(35 + j, p, int(np.prod(s))).reshape(s) for p in range(size)]
                for j, s in enumerate(shapes)]
        f = tf.function(lambda a, b: [hvd.gtopk_allreduce(a, density=0.02, name="two.a").output,
                                      hvd.gtopk_allreduce(b, density=0.02, name="two.b").output])
        outputs = f(tf.constant(accs[0][rank]), tf.constant(accs[1][rank]))
        for j, out in enumerate(outputs):
            flat = [a.reshape(-1) for a in accs[j]]
            want = gtopk_step(flat, k_for(flat[0].size, 0.02))
            assert_equal(out.numpy().reshape(-1), want.dense(flat[0].size, average_over=size),
                         f"buffer {j}")


def gtopk_conservation_and_sum(tf, hvd, rec, rank, size):
    with rec("gtopk_op_sum_conserves_mass"):
        d = 256
        accs = [rank_array(40, p, d, integer=True) for p in range(size)]
        res = run(tf, hvd, "eager", accs[rank], density=0.05, name="sum", op=hvd.Sum)
        all_eps = hvd.allgather(tf.constant(res["residual"].reshape(1, -1)), name="sum.eps")
        check_against_reference(res, gtopk_step(accs, k_for(d, 0.05)), size, rank,
                                average=False)
        total = all_eps.numpy().sum(0) + res["output"]
        assert_equal(total, np.sum(accs, axis=0), "conservation")


def gtopk_density_one(tf, hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"gtopk_density_1_equals_hvd_allreduce_{mode}"):
            d = 999
            accs = [rank_array(50, p, d, integer=True, low=-100, high=101) for p in range(size)]
            res = run(tf, hvd, mode, accs[rank], density=1.0, name=f"dense.g{mode}", op=hvd.Sum)
            dense = hvd.allreduce(tf.constant(accs[rank]), name=f"dense.h{mode}", op=hvd.Sum)
            avg = run(tf, hvd, mode, accs[rank], density=1.0, name=f"dense.a{mode}")
            assert_equal(res["output"], dense.numpy(), "density 1 vs hvd.allreduce(Sum)")
            assert float(np.abs(res["residual"]).max()) == 0.0
            assert_equal(avg["output"], dense.numpy() / size, "density 1 Average")


def topk_algorithm(tf, hvd, rec, rank, size):
    for integer, mode in [(False, "eager"), (True, "graph")]:
        with rec(f"topk_allgather_{'ties' if integer else 'random'}_{mode}_equals_reference"):
            d, density = 1200, 0.01
            accs = [rank_array(60 + integer, p, d, integer=integer) for p in range(size)]
            k = k_for(d, density)
            res = run(tf, hvd, mode, accs[rank], density=density, algorithm="topk",
                      name=f"topk{integer}")
            want = topk_allgather_step(accs, k)
            assert_equal(res["output"], want.dense(d, average_over=size), "topk dense output")
            assert_equal(res["residual"], want.residuals[rank], "topk residual")
            assert_equal(res["local_indices"], want.local_indices[rank].astype(np.int32), "local")
            assert int(res["bytes_sent"]) == topk_wire_bytes(k, size)


def bytes_and_dtypes(tf, hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"gtopk_bytes_sent_follow_the_schedule_{mode}"):
            k = 7
            res = run(tf, hvd, mode, np.arange(100, dtype=np.float32) * (rank + 1),
                      density=k / 100, name="bytes")
            assert int(res["bytes_sent"]) == gtopk_wire_bytes(k, rank, size), res["bytes_sent"]
    for dtype in ("float16", "bfloat16"):
        with rec(f"gtopk_{dtype}_input_float32_residual"):
            d = 400
            halves = [tf.cast(rank_array(70, p, d), dtype) for p in range(size)]
            accs = [tf.cast(h, tf.float32).numpy() for h in halves]
            res = hvd.gtopk_allreduce(halves[rank], density=0.05, name=f"half{dtype}")
            want = gtopk_step(accs, k_for(d, 0.05))
            assert res.output.dtype == dtype and res.residual.dtype == tf.float32
            assert_equal(res.residual, want.residuals[rank], "residual")
            expected = tf.cast(want.dense(d, average_over=size), dtype)
            assert_equal(tf.cast(res.output, tf.float32), tf.cast(expected, tf.float32).numpy(),
                         "output")


def bad_input(tf, hvd, rec, rank, size):
    with rec("gtopk_bad_input_raises_then_collectives_still_work"):
        x = tf.ones([10])
        cases = [({"density": 0.0}, ValueError, "density"),
                 ({"density": float("nan")}, ValueError, "density"),
                 ({"op": hvd.Adasum}, ValueError, "Adasum"),
                 ({"algorithm": "ring"}, ValueError, "algorithm"),
                 ({"residual": tf.zeros([3])}, ValueError, "residual"),
                 ({"process_set": hvd.ProcessSet([0])}, ValueError, "process_set")]
        for kwargs, error, text in cases:
            try:
                hvd.gtopk_allreduce(x, name="bad", **kwargs)
            except error as exc:
                assert text in str(exc), exc
            else:
                raise AssertionError(f"{kwargs} did not raise")
        try:
            hvd.gtopk_allreduce(tf.ones([10], tf.int32), name="bad")
        except ValueError as exc:
            assert "floating-point" in str(exc), exc
        else:
            raise AssertionError("an int32 tensor did not raise")
        res = hvd.gtopk_allreduce(x * (rank + 1), density=1.0, name="after.bad", op=hvd.Sum)
        assert_equal(res.output, np.full(10, size * (size + 1) / 2, np.float32), "after")


def main():
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    for scenario in (gtopk_random, gtopk_ties, gtopk_large_fast_path, gtopk_residual_feedback,
                     gtopk_two_buffers_in_one_graph, gtopk_conservation_and_sum,
                     gtopk_density_one, topk_algorithm, bytes_and_dtypes, bad_input):
        scenario(tf, hvd, rec, rank, size)
    finish(tf, hvd, rec)


if __name__ == "__main__":
    main()
