"""Scenarios: gtopk_hvd.torch.gtopk_allreduce on every rank against the NumPy reference.

Run by torch_worker.py under ``horovodrun -np N`` (checked by test_torch_collective.py); each
scenario asserts on this rank and is recorded with tests.harness.Recorder.
"""
import numpy as np
import torch
from _common import assert_equal, rank_array, same_on_every_rank

from gtopk_hvd.common import k_for
from gtopk_hvd.common.collective import gtopk_wire_bytes, topk_wire_bytes
from gtopk_hvd.common.reference import gtopk_step, topk_allgather_step


def check_against_reference(hvd, res, want, acc, size, rank, average=True):
    """The full contract of one call: global set, dense output, local set, alive, residual."""
    d = acc.size
    assert_equal(res.indices, want.indices.astype(np.int32), "global indices")
    assert_equal(res.values, want.values, "global values")
    assert_equal(res.local_indices, want.local_indices[rank].astype(np.int32), "local indices")
    assert_equal(res.alive, want.alive[rank], "alive flags")
    assert_equal(res.residual, want.residuals[rank], "residual")
    assert_equal(res.output.reshape(-1), want.dense(d, average_over=size if average else 1),
                 "dense output")


def gtopk_random(hvd, rec, rank, size):
    for seed, d, density, shape in [(1, 1000, 0.01, (1000,)), (2, 4096, 0.003, (64, 64)),
                                    (3, 777, 0.1, (7, 111)), (4, 50, 0.5, (50,))]:
        with rec(f"gtopk_random_d{d}_density{density}_equals_reference") as data:
            accs = [rank_array(seed, p, d) for p in range(size)]
            res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]).reshape(shape),
                                      density=density, name=f"rand{seed}")
            same = same_on_every_rank(hvd, res.output, f"same{seed}")
            want = gtopk_step(accs, k_for(d, density))
            assert res.output.shape == shape
            check_against_reference(hvd, res, want, accs[rank], size, rank)
            assert same, "the output differs between ranks"
            data["k"] = res.k


def gtopk_ties(hvd, rec, rank, size):
    with rec("gtopk_heavy_ties_integer_valued_equals_reference"):
        d, density = 2000, 0.02
        accs = [rank_array(10, p, d, integer=True) for p in range(size)]
        res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]), density=density, name="ties")
        check_against_reference(hvd, res, gtopk_step(accs, k_for(d, density)), accs[rank],
                                size, rank)
    with rec("gtopk_all_zero_input_selects_lowest_indices"):
        d = 300
        accs = [np.zeros(d, np.float32) for _ in range(size)]
        res = hvd.gtopk_allreduce(torch.zeros(d), density=0.01, name="zeros")
        want = gtopk_step(accs, 3)
        check_against_reference(hvd, res, want, accs[rank], size, rank)
        assert res.indices.tolist() == [0, 1, 2], res.indices


def gtopk_large_fast_path(hvd, rec, rank, size):
    """Buffers above 2^18 elements go through the threshold-estimate selection."""
    for seed, integer in [(20, False), (21, True)]:
        with rec(f"gtopk_large_buffer_{'ties' if integer else 'random'}_equals_reference"):
            d, density = 300_000, 0.001
            accs = [rank_array(seed, p, d, integer=integer, low=-20, high=21)
                    for p in range(size)]
            res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]), density=density,
                                      name=f"large{seed}")
            check_against_reference(hvd, res, gtopk_step(accs, k_for(d, density)), accs[rank],
                                    size, rank)


def gtopk_residual_feedback(hvd, rec, rank, size):
    with rec("gtopk_three_steps_with_residual_equal_reference_iterated"):
        d, k = 500, 10
        results, residual, in_place = [], None, []
        for t in range(3):  # communicate first, assert afterwards: no rank leaves early
            grad = torch.from_numpy(rank_array(30 + t, rank, d))
            res = hvd.gtopk_allreduce(grad, density=k / d, name="feedback", residual=residual)
            in_place.append(residual is None or res.residual is residual)
            residual = res.residual
            res.residual = res.residual.clone()  # the next call updates it in place
            results.append(res)
        eps_ref = [np.zeros(d, np.float32) for _ in range(size)]
        for t, res in enumerate(results):
            grads = [rank_array(30 + t, p, d) for p in range(size)]
            want = gtopk_step([g + e for g, e in zip(grads, eps_ref)], k)
            check_against_reference(hvd, res, want, grads[rank] + eps_ref[rank], size, rank)
            eps_ref = want.residuals
        assert all(in_place), "a residual passed in must be updated in place"
        assert float(residual.abs().sum()) > 0, "residual should carry the unsent mass"


def gtopk_conservation_and_sum(hvd, rec, rank, size):
    with rec("gtopk_op_sum_conserves_mass"):
        d = 256
        accs = [rank_array(40, p, d, integer=True) for p in range(size)]
        res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]), density=0.05, name="sum",
                                  op=hvd.Sum)
        # sum_p acc^p = sum_p eps^p + output: gather the residuals to check the invariant
        all_eps = hvd.allgather(res.residual.reshape(1, -1), name="sum.eps")
        want = gtopk_step(accs, k_for(d, 0.05))
        check_against_reference(hvd, res, want, accs[rank], size, rank, average=False)
        total = all_eps.sum(0) + res.output
        assert_equal(total, np.sum(accs, axis=0), "conservation")


def gtopk_density_one(hvd, rec, rank, size):
    with rec("gtopk_density_1_equals_hvd_allreduce"):
        d = 999
        accs = [rank_array(50, p, d, integer=True, low=-100, high=101) for p in range(size)]
        x = torch.from_numpy(accs[rank])
        res = hvd.gtopk_allreduce(x, density=1.0, name="dense.g", op=hvd.Sum)
        dense = hvd.allreduce(x, name="dense.h", op=hvd.Sum)
        avg = hvd.gtopk_allreduce(x, density=1.0, name="dense.a")
        ref_avg = hvd.allreduce(x, name="dense.b")  # Average: sum * (1/P) inside Horovod
        assert_equal(res.output, dense.numpy(), "density 1 vs hvd.allreduce(Sum)")
        assert float(res.residual.abs().max()) == 0.0
        np.testing.assert_allclose(avg.output.numpy(), ref_avg.numpy(), rtol=1e-6)
        assert_equal(avg.output, dense.numpy() / size, "density 1 Average")


def topk_algorithm(hvd, rec, rank, size):
    for integer in (False, True):
        with rec(f"topk_allgather_{'ties' if integer else 'random'}_equals_reference"):
            d, density = 1200, 0.01
            accs = [rank_array(60 + integer, p, d, integer=integer) for p in range(size)]
            k = k_for(d, density)
            res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]), density=density,
                                      algorithm="topk", name=f"topk{integer}")
            want = topk_allgather_step(accs, k)
            assert_equal(res.output, want.dense(d, average_over=size), "topk dense output")
            assert_equal(res.residual, want.residuals[rank], "topk residual")
            assert_equal(res.local_indices, want.local_indices[rank].astype(np.int32), "local")
            assert res.bytes_sent == topk_wire_bytes(k, size)


def bytes_and_dtypes(hvd, rec, rank, size):
    with rec("gtopk_bytes_sent_follow_the_schedule"):
        k = 7
        res = hvd.gtopk_allreduce(torch.arange(100, dtype=torch.float32) * (rank + 1),
                                  density=k / 100, name="bytes")
        assert res.bytes_sent == gtopk_wire_bytes(k, rank, size), res.bytes_sent
    for dtype in (torch.float16, torch.bfloat16):
        with rec(f"gtopk_{str(dtype).split('.')[-1]}_input_float32_residual"):
            d = 400
            halves = [torch.from_numpy(rank_array(70, p, d)).to(dtype) for p in range(size)]
            accs = [h.float().numpy() for h in halves]
            res = hvd.gtopk_allreduce(halves[rank], density=0.05, name=f"half{dtype}")
            want = gtopk_step(accs, k_for(d, 0.05))
            assert res.output.dtype == dtype and res.residual.dtype == torch.float32
            assert_equal(res.residual, want.residuals[rank], "residual")
            expected = torch.from_numpy(want.dense(d, average_over=size)).to(dtype)
            assert_equal(res.output.float(), expected.float().numpy(), "output")


def bad_input(hvd, rec, rank, size):
    with rec("gtopk_bad_input_raises_then_collectives_still_work"):
        x = torch.ones(10)
        for kwargs, text in [({"density": 0.0}, "density"), ({"op": hvd.Adasum}, "Adasum"),
                             ({"algorithm": "ring"}, "algorithm"),
                             ({"residual": torch.zeros(3)}, "residual")]:
            try:
                hvd.gtopk_allreduce(x, name="bad", **kwargs)
            except ValueError as exc:
                assert text in str(exc), exc
            else:
                raise AssertionError(f"{kwargs} did not raise")
        res = hvd.gtopk_allreduce(x * (rank + 1), density=1.0, name="after.bad", op=hvd.Sum)
        assert_equal(res.output, np.full(10, size * (size + 1) / 2, np.float32), "after")


def in_place(hvd, rec, rank, size):
    """gtopk_allreduce_ writes the result into its input (float32 contiguous directly, other
    layouts and dtypes through a copy) and gives the same bits as the reference."""
    cases = [("gtopk", torch.float32, False), ("topk", torch.float32, False),
             ("gtopk", torch.float32, True), ("gtopk", torch.float16, False)]
    for algorithm, dtype, transposed in cases:
        label = f"{algorithm}_{str(dtype).split('.')[-1]}{'_noncontiguous' if transposed else ''}"
        with rec(f"in_place_{label}_equals_reference_and_writes_the_input"):
            d, density = 600, 0.02
            grads = [torch.from_numpy(rank_array(80, p, d)).to(dtype) for p in range(size)]
            accs = [g.float().numpy() for g in grads]
            x = grads[rank].clone().reshape(20, 30)
            if transposed:
                x = x.t()  # (30, 20), not contiguous: the flat order is x.reshape(-1)
                accs = [g.float().reshape(20, 30).t().reshape(-1).numpy() for g in grads]
            res = hvd.gtopk_allreduce_(x, density=density, name=f"inplace.{label}",
                                       algorithm=algorithm)
            k = k_for(d, density)
            want = (gtopk_step if algorithm == "gtopk" else topk_allgather_step)(accs, k)
            assert res.output is x, "gtopk_allreduce_ must return its input as the output"
            expected = torch.from_numpy(want.dense(d, average_over=size)).to(dtype).float()
            assert_equal(x.reshape(-1).float(), expected.numpy(), "in-place output")
            assert_equal(res.residual, want.residuals[rank], "residual")


def static_pair_sets(hvd, rec, rank, size):
    """Under horovodrun, gtopk_hvd.torch.init() passes the pairs to hvd.init as static process
    sets: every pair of the schedule is registered and Horovod runs without dynamic sets."""
    with rec("init_registers_every_pair_as_a_static_process_set"):
        import os

        from horovod.common.process_sets import _basics

        from gtopk_hvd.common.schedule import exchange_groups
        registered = {tuple(r) for r in _basics._get_process_set_ids_and_ranks().values()}
        want = {g for g in exchange_groups(size) if len(g) < size}
        assert want <= registered, f"missing pair sets {sorted(want - registered)}"
        assert os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") in (None, "", "0"), \
            "dynamic process sets were switched on"
        try:
            hvd.add_process_set([0])  # refused by Horovod without dynamic process sets
        except Exception as exc:  # noqa: BLE001 (Horovod raises a plain RuntimeError / ValueError)
            assert "dynamic" in str(exc).lower() or "DYNAMIC" in str(exc), exc
        else:
            raise AssertionError("hvd.add_process_set worked: Horovod runs with dynamic sets")


SCENARIOS = (gtopk_random, gtopk_ties, gtopk_large_fast_path, gtopk_residual_feedback,
             gtopk_conservation_and_sum, gtopk_density_one, topk_algorithm, bytes_and_dtypes,
             bad_input, in_place, static_pair_sets)
