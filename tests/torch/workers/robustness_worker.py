"""Scenarios: gTop-k inside ordinary training programs, at world sizes 3, 5, 6 and 7.

Run under ``horovodrun -np N`` by test_torch_robustness.py at P = 6 (and 5, 7 under
``make test-stress``), and inside the torch job at P = 3 (torch_worker.py ``--robustness``,
tests/jobs.py).  What a user's program does around the optimizer: unnamed Horovod collectives
between steps, NaN / Inf in one rank's gradients, loss scaling with GradScaler, set-ups that
differ across ranks.  Every rank checks its parameters against the simulated reference
(reference_sgd.py) or against every other rank.  A job of its own ends with a plain
``hvd.shutdown()`` (no barrier): every rank issues the same operations, so none is left
behind in an exchange.
"""

import numpy as np
import torch
from _common import Recorder, assert_equal, same_on_every_rank
from optimizer_worker import flat_params, loss_for, make_model, simulate, train
from reference_sgd import ReferenceRun

import horovod.torch as plain_hvd
import gtopk_hvd.torch as hvd
from gtopk_hvd.common import PlanMismatchError, StepwiseDensity

LR = 0.1
GRANULARITIES = ("model", "layer", "bucket")


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


# granularity='bucket' with one tensor per bucket (each of make_model's is over 10 bytes)
BUCKET_CAP = {"bucket_cap_mb": 1e-5}


def _extra(granularity):
    return BUCKET_CAP if granularity == "bucket" else {}


def unnamed_collectives(rec, rank, size):
    for granularity in GRANULARITIES:
        with rec(f"unnamed_collectives_after_every_step_{granularity}"):
            model = make_model(11)
            opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                           named_parameters=model.named_parameters(),
                                           density=0.2, granularity=granularity,
                                           **_extra(granularity))
            ref = ReferenceRun(model, sgd, size, 0.2, granularity, **_extra(granularity))
            loss, ref_loss = loss_for(11), loss_for(11)
            for step in range(3):
                got = train(hvd, model, opt, loss, steps=1)[0]
                want = simulate(ref, ref_loss, steps=1)[0]
                assert_equal(got, want.numpy(), f"params after step {step + 1}")
                # what users write between steps: no name= anywhere
                total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)
                assert total.item() == size * (size - 1) / 2, total
                ranks = hvd.allgather(torch.tensor([rank]))
                assert ranks.tolist() == list(range(size)), ranks
                root = hvd.broadcast(torch.tensor([rank * 10.0]), root_rank=size - 1)
                assert root.item() == (size - 1) * 10.0
                assert hvd.broadcast_object({"step": step}, root_rank=0) == {"step": step}
                rows = hvd.allgather(flat_params(model).view(1, -1))
                assert bool((rows == rows[0]).all()), "ranks hold different parameters"
            # the end of an epoch with uneven data: every rank joins, then training goes on
            last = hvd.join()
            assert 0 <= last < size, last
            got = train(hvd, model, opt, loss, steps=1)[0]
            assert_equal(got, simulate(ref, ref_loss, steps=1)[0].numpy(), "after hvd.join()")


def _poison(model, rank, bad_rank, value):
    if rank == bad_rank:
        grad = list(model.parameters())[0].grad
        grad.view(-1)[3] = value


def nonfinite(rec, rank, size):
    bad_rank = size - 1
    for granularity in GRANULARITIES:
        for value in (float("nan"), float("inf")):
            tag = f"{granularity}_{'nan' if value != value else 'inf'}"
            with rec(f"nonfinite_on_one_rank_skipped_everywhere_residuals_kept_{tag}"):
                model = make_model(21)
                opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                               named_parameters=model.named_parameters(),
                                               density=0.2, granularity=granularity,
                                               **_extra(granularity))
                ref = ReferenceRun(model, sgd, size, 0.2, granularity, **_extra(granularity))
                loss, ref_loss = loss_for(21), loss_for(21)
                for step in range(4):
                    opt.zero_grad()
                    loss(model, rank, 0).backward()
                    if step == 1:
                        _poison(model, rank, bad_rank, value)
                        before = {n: e.clone() for n, e in opt.gtopk_state.residuals.items()}
                    opt.synchronize()
                    grads = [p.grad for p in model.parameters()]
                    finite = all(bool(torch.isfinite(g).all()) for g in grads)
                    if step == 1:
                        # every rank: NaN in every gradient, residuals bit for bit as before
                        assert all(bool(torch.isnan(g).all()) for g in grads), "not all NaN"
                        for n, e in opt.gtopk_state.residuals.items():
                            assert_equal(e, before[n].numpy(), f"residual {n}")
                        stats = opt.gtopk_stats()
                        assert stats["nonfinite_steps"] == 1 and not stats["finite"], stats
                        assert stats["step"] == 1, stats
                        loss.step += 1
                        ref_loss.step += 1  # the reference never sees the bad step
                        continue
                    assert finite
                    with opt.skip_synchronize():
                        opt.step()
                    loss.step += 1
                    want = simulate(ref, ref_loss, steps=1)[0]
                    assert_equal(flat_params(model), want.numpy(), f"params after step {step}")
                assert same_on_every_rank(hvd, flat_params(model), f"nonfinite.{tag}")


def _scaled_run(rank, size, steps, scaler=None, overflow_at=None, **kwargs):
    """Train with or without GradScaler in Horovod's pattern; params and scales per step.
    ``kwargs``: more arguments of the optimizer (hierarchical=True)."""
    model = make_model(31)
    opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                   named_parameters=model.named_parameters(), density=0.1,
                                   grad_scaler=scaler, **kwargs)
    loss, history = loss_for(31), []
    for step in range(steps):
        opt.zero_grad()
        out = loss(model, rank, 0)
        (scaler.scale(out) if scaler else out).backward()
        if step == overflow_at:
            _poison(model, rank, size - 1, float("inf"))
        if scaler is None:
            opt.step()
        else:
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
        loss.step += 1
        history.append((flat_params(model).clone(), scaler.get_scale() if scaler else 1.0,
                        float(out)))
    return history, opt


def loss_scaling(rec, rank, size, prefix="", **kwargs):
    """The GradScaler scenarios; ``prefix`` names them, ``kwargs`` go to the optimizer
    (tests/torch/workers/hierarchical_worker.py runs the first two hierarchically)."""
    with rec(f"{prefix}grad_scaler_bit_identical_to_the_unscaled_run_across_scale_growth"):
        plain, _ = _scaled_run(rank, size, 6, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=2)
        scaled, opt = _scaled_run(rank, size, 6, scaler, **kwargs)
        scales = [s for _, s, _ in scaled]
        assert scales[-1] > scales[0], f"the scale never grew: {scales}"
        for step, ((a, _, _), (b, _, _)) in enumerate(zip(plain, scaled)):
            assert_equal(b, a.numpy(), f"params after step {step + 1} (scales {scales})")
        assert opt.gtopk_stats()["nonfinite_steps"] == 0
    with rec(f"{prefix}grad_scaler_overflow_on_one_rank_skips_one_step_everywhere"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
        history, opt = _scaled_run(rank, size, 5, scaler, overflow_at=2, **kwargs)
        scales = [s for _, s, _ in history]
        assert scales == [2.0 ** 8] * 2 + [2.0 ** 7] * 3, scales
        assert torch.equal(history[2][0], history[1][0]), "the overflow step changed params"
        assert not torch.equal(history[3][0], history[2][0])
        assert all(np.isfinite(l) for _, _, l in history)
        assert opt.gtopk_stats()["nonfinite_steps"] == 1
        assert all(bool(torch.isfinite(e).all()) for e in opt.gtopk_state.residuals.values())
        assert same_on_every_rank(hvd, history[-1][0], f"{prefix}scaler.overflow")
    if kwargs:
        return
    for granularity in GRANULARITIES:
        suffix = "" if granularity == "model" else f"_{granularity}"
        with rec(f"grad_scaler_unscaled_before_synchronize_is_refused{suffix}"):
            model = make_model(32)
            scaler = torch.amp.GradScaler("cpu")
            opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                           named_parameters=model.named_parameters(),
                                           grad_scaler=scaler, granularity=granularity,
                                           **_extra(granularity))
            if granularity == "bucket":  # the second step's exchanges start in backward
                scaler.scale(loss_for(32)(model, rank, 0)).backward()
                opt.synchronize()
                scaler.unscale_(opt)
                with opt.skip_synchronize():
                    scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            scaler.scale(loss_for(32)(model, rank, 0)).backward()
            try:
                scaler.step(opt)  # unscales first, then opt.step() synchronises: refused
            except hvd.GTopkError as exc:
                assert "optimizer.synchronize()" in str(exc), exc
            else:
                raise AssertionError("unscaled gradients were synchronised")


def _expect_mismatch(build, rank, words):
    model, opt = build()
    try:
        opt.zero_grad()
        loss_for(41)(model, rank, 0).backward()
        opt.step()
    except PlanMismatchError as exc:
        for w in words:
            assert w in str(exc), exc
        return str(exc)
    raise AssertionError("a set-up that differs across ranks was not refused")


def mismatches(rec, rank, size):
    odd = rank == size - 1

    def opt_for(model, **kw):
        return hvd.DistributedOptimizer(sgd(model.parameters()),
                                        named_parameters=model.named_parameters(), **kw)

    cases = {
        "density": (lambda m: opt_for(m, density=0.2 if odd else 0.1), ["buffers[0]"]),
        "granularity": (lambda m: opt_for(m, density=0.1,
                                          granularity="layer" if odd else "model"),
                        ["granularity"]),
        "dense_threshold": (lambda m: opt_for(m, density=0.1, granularity="layer",
                                              dense_threshold=10 if odd else 0),
                            ["dense_threshold"]),
        "bucket_cap_mb": (lambda m: opt_for(m, density=0.1, granularity="bucket",
                                            bucket_cap_mb=1e-3 if odd else 1e-5),
                          ["buffers[0]"]),
        "granularity_bucket": (lambda m: opt_for(m, density=0.1,
                                                 granularity="bucket" if odd else "model"),
                               ["granularity"]),
        "parameter_order": (lambda m: hvd.DistributedOptimizer(
            sgd(list(m.parameters())[::-1] if odd else m.parameters()),
            named_parameters=m.named_parameters(), density=0.1, granularity="layer"),
            ["buffers[0]"]),
    }
    for what, (make, words) in cases.items():
        with rec(f"mismatched_{what}_raises_on_every_rank"):
            def build():
                model = make_model(41)
                return model, make(model)
            _expect_mismatch(build, rank, words + [f"rank {size - 1}"])
    with rec("mismatched_shape_raises_on_every_rank"):
        def build():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 17 if odd else 16), torch.nn.Tanh(),
                                        torch.nn.Linear(17 if odd else 16, 4))
            return model, hvd.DistributedOptimizer(
                sgd(model.parameters()), named_parameters=model.named_parameters(), density=0.1)
        _expect_mismatch(build, rank, ["buffers[0]"])
    with rec("mismatched_density_at_the_third_overlapped_bucket_step_raises_on_every_rank"):
        model = make_model(43)
        density = StepwiseDensity([0.1, 0.3], steps_per_epoch=2) if odd else 0.1
        opt = opt_for(model, density=density, granularity="bucket", **BUCKET_CAP)
        train(hvd, model, opt, loss_for(43), steps=2)  # the second one overlapped
        started = None
        try:
            opt.zero_grad()
            loss_for(43)(model, rank, 0).backward()
            started = opt._gtopk_sync.pipeline is not None and opt._gtopk_sync.pipeline.started
            opt.step()
        except PlanMismatchError as exc:
            assert "buffers[0]" in str(exc) and f"rank {size - 1}" in str(exc), exc
        else:
            raise AssertionError("a density that differs at step 3 was not refused")
        assert started, "the refused step did not start during backward"
    with rec("training_goes_on_after_a_refused_step"):
        model = make_model(42)
        opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                       named_parameters=model.named_parameters(), density=0.1)
        got = train(hvd, model, opt, loss_for(42), steps=2)[-1]
        assert same_on_every_rank(hvd, got, "after.mismatch")


def momentum_sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def uneven_epoch(model, opt, ref, loss, ref_loss, batches, rank):
    """An epoch in which rank q has ``batches[q]`` batches: every step this rank takes equals
    the reference in which the ranks that ran out contribute zeros (``ref.joined``); returns
    this rank's residuals after its last step."""
    residuals = {}
    for step in range(max(batches)):
        ref.joined = {q for q in range(len(batches)) if step >= batches[q]}
        want = simulate(ref, ref_loss, steps=1)[0]
        if step < batches[rank]:
            got = train(hvd, model, opt, loss, steps=1)[0]
            assert_equal(got, want.numpy(), f"params after step {step + 1}")
        if step + 1 == batches[rank]:
            residuals = {n: r.clone() for n, r in opt.gtopk_state.residuals.items()}
    return residuals


def uneven_data_join(rec, rank, size):
    """Rank r has 2 + r batches, then calls hvd.join(): every step equals the reference in
    which the ranks that joined contribute zeros and keep their residuals; join() returns the
    last rank on every rank, every rank leaves with the same parameters and momentum, and
    the next epoch and the user's unnamed collectives go on."""
    batches = [2 + r for r in range(size)]
    for granularity in GRANULARITIES:
        with rec(f"join_with_uneven_data_{granularity}"):
            model = make_model(21)
            opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                           named_parameters=model.named_parameters(),
                                           density=0.2, granularity=granularity,
                                           **_extra(granularity))
            ref = ReferenceRun(model, momentum_sgd, size, 0.2, granularity,
                               **_extra(granularity))
            loss, ref_loss = loss_for(21), loss_for(21)
            residuals = uneven_epoch(model, opt, ref, loss, ref_loss, batches, rank)
            assert hvd.join() == size - 1
            assert_equal(flat_params(model), flat_params(ref.model).numpy(), "after join")
            for name, eps in opt.gtopk_state.residuals.items():  # kept while joined
                assert torch.equal(eps, residuals[name]), name
            if granularity == "model":
                assert_equal(opt.gtopk_state.residuals["model"], ref.residual(rank),
                             "residual")
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)
            assert total.item() == size * (size - 1) / 2, total
            ref.joined = set()  # the next epoch: every rank again, momentum from the last
            loss.step = ref_loss.step
            got = train(hvd, model, opt, loss, steps=1)[0]
            assert_equal(got, simulate(ref, ref_loss, steps=1)[0].numpy(), "next epoch")


SCENARIOS = (unnamed_collectives, nonfinite, loss_scaling, mismatches, uneven_data_join)


def main():
    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    rec = Recorder(rank)
    for scenario in SCENARIOS:
        scenario(rec, rank, size)
    rec.save()
    plain_hvd.shutdown()  # Horovod's own, no barrier


if __name__ == "__main__":
    main()
