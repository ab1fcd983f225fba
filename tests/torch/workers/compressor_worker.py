"""Scenarios: ``horovod.torch.DistributedOptimizer`` (Horovod's own, unmodified) with
``compression=gtopk_hvd.torch.Compression.gtopk(...)`` against the simulated reference at
layer granularity (one gTop-k per tensor).

Run by torch_worker.py under ``horovodrun -np N`` (checked by test_torch_compressor.py).
Scenarios communicate first and assert afterwards.
"""
import horovod.torch as horovod_hvd
import numpy as np
import torch
from _common import assert_equal, rank_array, same_on_every_rank
from optimizer_worker import flat_params, loss_for, make_model, momentum_sgd, sgd, simulate
from reference_sgd import ReferenceRun
from torch import nn

from gtopk_hvd.common.plan import PlanMismatchError
from gtopk_hvd.torch import Compression
from gtopk_hvd.torch.functional import gtopk_allreduce


def _horovod_optimizer(model, make_opt, compression, **kwargs):
    return horovod_hvd.DistributedOptimizer(make_opt(model.parameters()),
                                            named_parameters=model.named_parameters(),
                                            compression=compression, **kwargs)


def _train(hvd, model, opt, loss, steps, between=None):
    history = []
    for t in range(steps):
        opt.zero_grad()
        loss(model, hvd.rank(), 0).backward()
        opt.step()
        loss.step += 1
        if between is not None:
            between(t)
        history.append(flat_params(model).clone())
    return history


def _check_residuals(compressor, model, ref, rank):
    names = [n for n, _ in model.named_parameters()]
    residuals = compressor.gtopk_state.residuals
    assert sorted(residuals) == sorted(names), sorted(residuals)
    for b, name in enumerate(names):
        assert_equal(residuals[name], ref.residual(rank, b), f"residual of {name}")


def trajectories(hvd, rec, rank, size):
    cases = [("gtopk_sgd", sgd, "gtopk", {}),
             ("gtopk_momentum", momentum_sgd, "gtopk", {}),
             ("topk_sgd", sgd, "topk", {}),
             ("gtopk_horovod_groups", sgd, "gtopk", {"groups": 2}),
             ("gtopk_backward_passes_2", sgd, "gtopk", {"backward_passes_per_step": 2})]
    for i, (tag, make_opt, algorithm, kwargs) in enumerate(cases):
        with rec(f"horovod_optimizer_{tag}_params_equal_layer_reference_every_step"):
            seed = 300 + i
            passes = kwargs.get("backward_passes_per_step", 1)
            model = make_model(seed)
            compressor = Compression.gtopk(density=0.1, algorithm=algorithm)
            opt = _horovod_optimizer(model, make_opt, compressor, **kwargs)
            ref = ReferenceRun(model, make_opt, size, 0.1, "layer", algorithm)
            loss, ref_loss = loss_for(seed), loss_for(seed)
            got = []
            for _ in range(4):
                opt.zero_grad()
                for j in range(passes):
                    loss(model, rank, j).backward()
                opt.step()
                loss.step += 1
                got.append(flat_params(model).clone())
            want = simulate(ref, ref_loss, steps=4, passes=passes)
            for t, (g, w) in enumerate(zip(got, want)):
                assert_equal(g, w.numpy(), f"params after step {t + 1}")
            _check_residuals(compressor, model, ref, rank)
            stats = compressor.gtopk_stats()
            assert stats["step"] == 4 and stats["finite"], stats
            assert stats["k"] == ref.last_k, (stats["k"], ref.last_k)


def dynamic_forward(hvd, rec, rank, size):
    with rec("horovod_optimizer_parameters_without_grad_on_some_ranks_count_as_zero"):
        torch.manual_seed(610)
        model = nn.ModuleDict({"a": nn.Linear(8, 4), "b": nn.Linear(8, 4), "c": nn.Linear(8, 4)})

        def loss(m, r, j):
            g = torch.Generator().manual_seed(610 + 7 * r + loss.step)
            x = torch.randn(5, 8, generator=g)
            out = m["a"](x)
            if r % 2 == 0:
                out = out + m["b"](x)  # odd ranks never touch b: Horovod zero-fills in set order
            if r != 1:
                out = out + m["c"](x)
            return (out ** 2).mean()
        loss.step = 0
        compressor = Compression.gtopk(density=0.2)
        opt = _horovod_optimizer(model, sgd, compressor)
        ref = ReferenceRun(model, sgd, size, 0.2, "layer")
        got = _train(hvd, model, opt, loss, steps=3)
        loss.step = 0
        want = simulate(ref, loss, steps=3)
        for t, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w.numpy(), f"params after step {t + 1}")


def unnamed_collectives(hvd, rec, rank, size):
    with rec("horovod_optimizer_unnamed_collectives_between_steps_still_match"):
        model = make_model(620)
        compressor = Compression.gtopk(density=0.1)
        opt = _horovod_optimizer(model, sgd, compressor)
        ref = ReferenceRun(model, sgd, size, 0.1, "layer")
        seen = []

        def between(t):  # the user's own unnamed collectives, every step
            seen.append(hvd.allreduce(torch.tensor([float(rank + t)]), op=hvd.Sum).item())
            seen.append(hvd.broadcast(torch.tensor([float(rank)]), root_rank=0).item())
        got = _train(hvd, model, opt, loss_for(620), steps=3, between=between)
        want = simulate(ref, loss_for(620), steps=3)
        for t, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w.numpy(), f"params after step {t + 1}")
        total = size * (size - 1) / 2
        assert seen == [v for t in range(3) for v in (total + size * t, 0.0)], seen


def nonfinite(hvd, rec, rank, size):
    with rec("horovod_optimizer_nan_on_one_rank_gives_nan_everywhere_residuals_kept"):
        model = make_model(630)
        compressor = Compression.gtopk(density=0.2)
        opt = _horovod_optimizer(model, sgd, compressor)
        loss = loss_for(630)
        opt.zero_grad()
        loss(model, rank, 0).backward()
        opt.step()
        loss.step += 1
        before = {n: e.clone() for n, e in compressor.gtopk_state.residuals.items()}
        opt.zero_grad()
        poison = None
        if rank == size - 1:  # before Horovod's hook compresses the gradient
            poison = next(model.parameters()).register_hook(
                lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
        loss(model, rank, 0).backward()
        if poison is not None:
            poison.remove()
        opt.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        stats = compressor.gtopk_stats()
        after = compressor.gtopk_state.residuals
        for n, g in grads.items():  # one verdict a step: every tensor NaN, every residual kept
            assert bool(torch.isnan(g).all()), f"{n} is not NaN"
            assert_equal(after[n], before[n].numpy(), f"residual of {n}")
        assert all(bool(torch.isfinite(e).all()) for e in after.values())
        assert stats["nonfinite_steps"] == 1 and not stats["finite"] and stats["step"] == 1
        assert same_on_every_rank(hvd, torch.cat([g.reshape(-1) for g in grads.values()]),
                                  "compressor.nan.same")


def mismatch(hvd, rec, rank, size):
    with rec("horovod_optimizer_mismatched_density_raises_on_every_rank"):
        model = make_model(640)
        compressor = Compression.gtopk(density=0.1 if rank else 0.2)
        opt = _horovod_optimizer(model, sgd, compressor)
        loss_for(640)(model, rank, 0).backward()
        error = None
        try:
            opt.synchronize()
        except PlanMismatchError as err:
            error = str(err)
        assert error is not None and "rank 1" in error and "buffers" in error, error


def direct_allreduce(hvd, rec, rank, size):
    with rec("hvd_allreduce_with_gtopk_compression_equals_gtopk_allreduce"):
        x = torch.from_numpy(rank_array(650, rank, 500))
        compressor = Compression.gtopk(density=0.05)
        got = [horovod_hvd.allreduce(x, name="cmp.direct", compression=compressor)
               for _ in range(3)]
        residual, want = None, []
        for _ in range(3):
            res = gtopk_allreduce(x, density=0.05, name="cmp.functional", residual=residual)
            residual = res.residual
            want.append(res.output)
        summed = horovod_hvd.allreduce(x, name="cmp.sum", op=horovod_hvd.Sum,
                                       compression=Compression.gtopk(density=1.0))
        dense = horovod_hvd.allreduce(x, name="cmp.dense", op=horovod_hvd.Sum)
        error = None
        try:  # refused before any communication, on every rank: the name keys the residual
            horovod_hvd.allreduce(x, compression=compressor)
        except ValueError as exc:
            error = str(exc)
        for t, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w.numpy(), f"call {t}")
        assert_equal(compressor.gtopk_state.residuals["cmp.direct"], residual.numpy(),
                     "residual")
        np.testing.assert_allclose(summed.numpy(), dense.numpy(), rtol=1e-5, atol=1e-5)
        assert error is not None and "name=" in error, error


def checkpoint(hvd, rec, rank, size):
    with rec("compressor_state_dict_round_trip_continues_the_trajectory"):
        model = make_model(660)
        compressor = Compression.gtopk(density=0.1)
        opt = _horovod_optimizer(model, sgd, compressor)
        ref = ReferenceRun(model, sgd, size, 0.1, "layer")
        loss, ref_loss = loss_for(660), loss_for(660)
        _train(hvd, model, opt, loss, steps=2)
        saved = compressor.state_dict()
        model2 = make_model(0)
        model2.load_state_dict(model.state_dict())
        compressor2 = Compression.gtopk(density=0.1)
        compressor2.load_state_dict(saved)
        opt2 = _horovod_optimizer(model2, sgd, compressor2)
        got = _train(hvd, model2, opt2, loss, steps=2)
        want = simulate(ref, ref_loss, steps=4)[2:]
        for t, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w.numpy(), f"params after step {t + 3}")


def refused(hvd, rec, rank, size):
    with rec("gtopk_compressor_refused_by_gtopk_optimizer_and_bad_arguments_rejected"):
        model = make_model(670)
        messages = []
        for make in (lambda: hvd.DistributedOptimizer(sgd(model.parameters()),
                                                      compression=Compression.gtopk(0.1)),
                     lambda: Compression.gtopk(density=1.5),
                     lambda: Compression.gtopk(density=0.1, algorithm="dense")):
            try:
                make()
            except ValueError as err:
                messages.append(str(err))
        assert len(messages) == 3, messages
        assert "pass density=" in messages[0], messages[0]
        assert "1.5" in messages[1] and "dense" in messages[2], messages
        assert Compression.none is horovod_hvd.Compression.none
        assert Compression.fp16 is horovod_hvd.Compression.fp16


def process_set_subset(hvd, rec, rank, size):
    with rec("horovod_optimizer_over_a_process_set_subset_refuses_the_compressor_no_deadlock"):
        # a registered set other than the global one: gtopk's own set of the first group
        # that holds rank 0 (P = 2, 4: a pair; P = 3: the three ranks of the fold group)
        from gtopk_hvd.common.process_sets import exchange_sets
        members, registered = next((sorted(g), s) for g, s in exchange_sets(hvd).items()
                                   if 0 in g)
        subset = horovod_hvd.ProcessSet(members)  # as the user's registered set: ranks, id
        subset.process_set_id = registered.process_set_id
        model = make_model(680)
        opt = _horovod_optimizer(model, sgd, Compression.gtopk(0.1), process_set=subset)
        refusal = None
        try:
            opt.zero_grad()
            loss_for(680)(model, rank, 0).backward()  # Horovod's hooks compress here
        except ValueError as err:
            refusal = str(err)
        # every rank goes on with the world: an unnamed collective after the refusal
        after = hvd.allreduce(torch.ones(1), op=hvd.Sum)
        assert after.item() == size, after
        if rank in members and subset.process_set_id != 0:
            assert refusal is not None and "process_set" in refusal, refusal
            assert "Compression.none" in refusal, refusal
        else:  # not a member; or P = 2 and 3, whose only group is the global set itself
            assert refusal is None, refusal
        assert size in (2, 3) or subset.process_set_id != 0, "no other set to try"


SCENARIOS = (trajectories, dynamic_forward, unnamed_collectives, nonfinite, mismatch,
             direct_allreduce, checkpoint, refused, process_set_subset)
