"""Scenarios: hierarchical gTop-k (``gtopk_allreduce(..., hierarchical=True)``) on emulated
nodes: horovodrun's ``-H localhost:2,127.0.0.1:2`` is two nodes of two ranks.  Every rank
checks its output and its shard's residual against the NumPy reference of the hierarchical
algorithm (gtopk_hvd.common.reference.hierarchical_step), bit for bit, every step.
"""
import numpy as np
import torch
from _common import Recorder, assert_equal
from optimizer_worker import (THREE_BUCKETS, deep_model, flat_params, loss_for, make_model,
                              simulate, train)
from reference_sgd import ReferenceRun, flat32
from robustness_worker import loss_scaling, uneven_epoch

from tests.auto_reference import MIXED_NUMELS, AutoHierarchicalReference, mixed_case

import horovod.torch as plain_hvd

import gtopk_hvd.torch as hvd
from gtopk_hvd.common.collective import gtopk_wire_bytes
from gtopk_hvd.common.cost import Link, buffer_methods
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.plan import PlanMismatchError
from gtopk_hvd.common.process_sets import job_layout
from gtopk_hvd.common.reference import hierarchical_step

D = 103


def grads_for(step, rank, integer=False):
    rng = np.random.default_rng([77, step, rank])
    if integer:
        return rng.integers(-5, 6, D).astype(np.float32)
    return rng.standard_normal(D).astype(np.float32)


class HierarchicalReference(ReferenceRun):
    """ReferenceRun whose synchronisation is the hierarchical step (one buffer a layer, or
    one for the model) with a residual per rank's shard."""

    def __init__(self, model, make_optimizer, size, density, granularity, local,
                 bucket_cap_mb=None):
        super().__init__(model, make_optimizer, size, density, granularity,
                         bucket_cap_mb=bucket_cap_mb)
        self.local = local
        self.carry = {}  # {buffer: {rank: what a layout change carries into its gradients}}
        self.eps = [[np.zeros(hi - lo, np.float32) for lo, hi in
                     (shard_bounds(sum(self.params[i].numel() for i in buf), local)[r % local]
                      for r in range(size))] for buf in self.buffers]

    def combine(self, grads):
        density = self.schedule(self.steps)
        for b, buf in enumerate(self.buffers):
            numels = [self.params[i].numel() for i in buf]
            flats = [np.zeros(sum(numels), np.float32) if r in self.joined else
                     np.concatenate([flat32(grads[r][i], n) for i, n in zip(buf, numels)])
                     for r in range(self.size)]
            for r, carried in self.carry.pop(b, {}).items():  # a layout change's carry
                flats[r] = flats[r] + carried
            res = hierarchical_step(flats, self.eps[b], self.local, density,
                                    joined=self.joined)
            self.eps[b] = res.residuals
            update, offset = res.dense(sum(numels), average_over=self.size), 0
            for i, n in zip(buf, numels):
                p = self.params[i]
                p.grad = torch.from_numpy(update[offset:offset + n].copy()).view_as(p)
                offset += n
        self.steps += 1


def _buffers(model, granularity):
    params = list(model.parameters())
    return [params] if granularity == "model" else [[p] for p in params]


def steps_equal_the_reference(model, opt, ref, loss, ref_loss, rank, size, steps=3):
    """``steps`` steps of ``opt``, each bit for bit the reference's, each followed by the
    user's unnamed allreduce."""
    for step in range(steps):
        got = train(hvd, model, opt, loss, steps=1)[0]
        want = simulate(ref, ref_loss, steps=1)[0]
        assert_equal(got, want.numpy(), f"params after step {step + 1}")
        total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
        assert total.item() == size * (size - 1) / 2, total


def momentum_sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def optimizer_scenarios(rec, rank, size, local):
    for granularity in ("model", "layer"):
        with rec(f"hierarchical_optimizer_{granularity}_equals_the_reference_every_step"):
            model = make_model(31)
            opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                           named_parameters=model.named_parameters(),
                                           density=0.1, granularity=granularity,
                                           hierarchical=True)
            ref = HierarchicalReference(model, momentum_sgd, size, 0.1, granularity, local)
            loss, ref_loss = loss_for(31), loss_for(31)
            steps_equal_the_reference(model, opt, ref, loss, ref_loss, rank, size)
            if local > 1:  # what crossed the network: the rail's stages, k of a shard each
                stats, n, nodes = opt.gtopk_stats(), rank // local, size // local
                cross = sum(gtopk_wire_bytes(k_for(hi - lo, 0.1), n, nodes)
                            for lo, hi in (shard_bounds(sum(p.numel() for p in buf), local)
                                           [rank % local] for buf in _buffers(model,
                                                                              granularity)))
                assert stats["bytes_sent_cross"] == cross, (stats, cross)
                assert stats["bytes_sent"] == cross + stats["bytes_sent_node"], stats
    with rec("hierarchical_optimizer_bucket_equals_the_reference_exchanged_during_backward"):
        # three buckets, each one hierarchical step whose node alltoall the backward pass's
        # hooks start; the residuals are this rank's shard of each bucket
        model = deep_model(2401)
        opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       density=0.15, granularity="bucket",
                                       bucket_cap_mb=THREE_BUCKETS, hierarchical=True)
        ref = HierarchicalReference(model, momentum_sgd, size, 0.15, "bucket", local,
                                    bucket_cap_mb=THREE_BUCKETS)
        loss, ref_loss = loss_for(2401), loss_for(2401)
        started = []
        for step in range(4):
            opt.zero_grad()
            loss(model, rank, 0).backward()
            pipeline = opt._gtopk_sync.pipeline
            started.append(pipeline is not None and pipeline.started)
            opt.step()
            loss.step += 1
            want = simulate(ref, ref_loss, steps=1)[0]
            assert_equal(flat_params(model), want.numpy(), f"params after step {step + 1}")
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
        assert len(ref.buffers) == 3, ref.buffers
        for b in range(3):
            assert_equal(opt.gtopk_state.residuals[f"bucket.{b}"], ref.eps[b][rank],
                         f"residual of bucket {b}")
        assert started == [False, True, True, True], started
        if local > 1:
            stats, n, nodes = opt.gtopk_stats(), rank // local, size // local
            cross = sum(gtopk_wire_bytes(k_for(len(eps[rank]), 0.15), n, nodes)
                        for eps in ref.eps)
            assert stats["bytes_sent_cross"] == cross, (stats, cross)
    with rec("hierarchical_carry_of_a_layout_change_joins_the_next_step_and_nothing_is_lost"):
        # what GTopkState.reshard leaves outside a rank's new part of the buffer (an Elastic
        # reset that changed the layout) goes into the next step's gradients before the
        # node's sum (hierarchical), or into the whole-buffer residual (a flat layout)
        model = make_model(37)
        opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       density=0.1, hierarchical=True)
        ref = HierarchicalReference(model, momentum_sgd, size, 0.1, "model", local)
        loss, ref_loss = loss_for(37), loss_for(37)
        steps_equal_the_reference(model, opt, ref, loss, ref_loss, rank, size, steps=1)
        numel = sum(p.numel() for p in model.parameters())
        carries = []
        for r in range(size):  # zero on the rank's own part, as reshard leaves it
            c = np.random.default_rng([37, r]).standard_normal(numel).astype(np.float32)
            lo, hi = shard_bounds(numel, local)[r % local]
            c[lo:hi] = 0
            carries.append(c)
        state = opt.gtopk_state
        held = float(np.sum(carries[rank].astype(np.float64) ** 2)) + \
            float(state.residuals["model"].double().pow(2).sum())
        assert abs(state.residual_norm() ** 2 - held) > 0  # the carry is not there yet
        state.carry["model"] = torch.from_numpy(carries[rank].copy())
        assert abs(state.residual_norm() ** 2 - held) <= 1e-9 * held
        if local > 1:
            ref.carry = {0: dict(enumerate(carries))}
        else:  # flat: the whole-buffer residual takes it in before the step
            ref.eps[0] = [e + c for e, c in zip(ref.eps[0], carries)]
        steps_equal_the_reference(model, opt, ref, loss, ref_loss, rank, size, steps=2)
        assert state.carry == {}, sorted(state.carry)
        assert_equal(state.residuals["model"], ref.eps[0][rank], "residual")
    with rec("hierarchical_auto_runs_the_mode_the_cost_model_chooses_bit_for_bit"):
        # algorithm="auto" with hierarchical=True: per step dense or gTop-k per buffer, and
        # for the sparsified ones flat or hierarchical gTop-k by the cost of this world's
        # nodes; a link whose network card is slow and node fast chooses hierarchical (on
        # every layout with two nodes or more), one whose node is slower than the network
        # flat; each run against its reference, bit for bit
        nodes = None if job_layout(hvd).mode == "flat" else (size // local, local)
        links = {"fast node": Link(0.0, 1.0, intra_alpha=0.0, intra_beta=1e-9),
                 "slow node": Link(0.0, 1e-3, intra_alpha=0.0, intra_beta=1.0)}
        for what, link in links.items():
            model = make_model(38)
            numel = sum(p.numel() for p in model.parameters())
            want = buffer_methods("auto", [numel], 0.1, size, link, dense_paid=True,
                                  nodes=nodes)
            if nodes is not None and nodes[0] > 1:
                assert want == (("hierarchical",) if what == "fast node" else ("gtopk",)), want
            opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                           named_parameters=model.named_parameters(),
                                           density=0.1, algorithm="auto", link=link,
                                           hierarchical=True)
            if want == ("hierarchical",):
                ref = HierarchicalReference(model, momentum_sgd, size, 0.1, "model", local)
            else:
                ref = ReferenceRun(model, momentum_sgd, size, 0.1, "model")
            steps_equal_the_reference(model, opt, ref, loss_for(38), loss_for(38), rank, size)
            assert opt.gtopk_stats()["methods"] == {want[0]: 1}, opt.gtopk_stats()
            eps = opt.gtopk_state.residuals["model"]
            assert_equal(eps, ref.eps[0][rank], f"residual ({what})")
    with rec("hierarchical_auto_dense_for_one_buffer_hierarchical_for_another_bit_for_bit"):
        # a density schedule makes the small parameter dense at its high density while the large one
        # stays hierarchical (one step runs both): what the small one held back as a shard
        # residual goes back to its whole-buffer residual and the dense allreduce applies it
        # in full; integer gradients make the dense sums exact in any order
        nodes = None if job_layout(hvd).mode == "flat" else (size // local, local)
        numels = MIXED_NUMELS
        densities, link, mixes = mixed_case(size, nodes, dense_paid=True)
        assert mixes or nodes is None or nodes[0] * nodes[1] in (3, 8), (nodes, "no mix")
        params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(params, lr=1.0), named_parameters=[(f"w{j}", p) for j, p in
                                                               enumerate(params)],
            density=lambda step: densities[min(step, 3)], granularity="layer",
            algorithm="auto", link=link, hierarchical=True)
        ref, w = AutoHierarchicalReference(numels, size, local), [np.zeros(n, np.float32)
                                                                   for n in numels]
        for t, density in enumerate(densities):
            methods = buffer_methods("auto", numels, density, size, link, dense_paid=True,
                                     nodes=nodes)
            grads = [[np.random.default_rng([47, t, p, j]).integers(-4, 5, n).astype(np.float32)
                      for j, n in enumerate(numels)] for p in range(size)]
            expected = ref.step(grads, methods, density)
            opt.zero_grad()
            sum((p * torch.from_numpy(g)).sum() for p, g in zip(params, grads[rank])).backward()
            opt.step()
            for j, p in enumerate(params):
                w[j] = w[j] - expected[j]
                assert_equal(p.detach(), w[j], f"step {t} parameter {j} ({methods[j]})")
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
    with rec("hierarchical_compressor_equals_the_reference_every_step"):
        # Horovod's own optimizer with Compression.gtopk(hierarchical=True): per tensor, as
        # the reference's layer granularity; the residuals are this rank's shards
        model = make_model(35)
        compressor = hvd.Compression.gtopk(density=0.1, hierarchical=True)
        opt = plain_hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                             named_parameters=model.named_parameters(),
                                             compression=compressor)
        ref = HierarchicalReference(model, momentum_sgd, size, 0.1, "layer", local)
        loss, ref_loss = loss_for(35), loss_for(35)
        steps_equal_the_reference(model, opt, ref, loss, ref_loss, rank, size)
        names = [n for n, _ in model.named_parameters()]
        for (name, p), eps in zip(model.named_parameters(), ref.eps):
            lo, hi = shard_bounds(p.numel(), local)[rank % local]
            assert compressor.gtopk_state.residuals[name].numel() == hi - lo, name
            assert_equal(compressor.gtopk_state.residuals[name], eps[rank], f"residual {name}")
        layout = job_layout(hvd)
        assert compressor.state_dict()["layout"] == (
            None if layout.mode == "flat" else [layout.mode, layout.nodes, layout.local_size])
        assert sorted(compressor.gtopk_state.residuals) == sorted(names)
    with rec("hierarchical_checkpoint_keeps_the_shard_residuals_for_its_own_layout_only"):
        model = make_model(33)
        opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       density=0.1, hierarchical=True)
        loss = loss_for(33)
        train(hvd, model, opt, loss, steps=2)
        saved = opt.state_dict()
        layout = job_layout(hvd)
        key = None if layout.mode == "flat" else [layout.mode, layout.nodes, layout.local_size]
        assert saved["gtopk"]["layout"] == key, saved["gtopk"]["layout"]
        eps = saved["gtopk"]["residuals"]["model"]
        numel = sum(p.numel() for p in model.parameters())
        lo, hi = shard_bounds(numel, local)[rank % local]
        assert eps.numel() == hi - lo, (eps.numel(), hi - lo)  # a shard, or the whole buffer
        # local only from here: loading communicates nothing
        for hierarchical in (True, False):
            again = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                             named_parameters=model.named_parameters(),
                                             density=0.1, hierarchical=hierarchical)
            again.load_state_dict(saved)
            residuals = again.gtopk_state.residuals
            if hierarchical or key is None:  # the same layout
                assert torch.equal(residuals["model"], eps), "residuals not restored"
            else:  # a shard's residual against a flat run's whole buffer: dropped
                assert residuals == {}, sorted(residuals)
            assert again.gtopk_stats()["step"] == 2
    with rec("hierarchical_on_some_ranks_only_is_refused_on_every_rank"):
        refused = job_layout(hvd).mode != "flat"  # where it falls back both modes run flat
        model = make_model(34)
        before = [p.detach().clone() for p in model.parameters()]
        opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       density=0.1, hierarchical=rank != 0)
        for attempt in range(2):  # refused again: nothing was verified
            try:
                train(hvd, model, opt, loss_for(34), steps=1)
            except PlanMismatchError as exc:
                assert refused and "hierarchical=True" in str(exc) and "rank 0 has False" in \
                    str(exc) and "hierarchical=" in str(exc).split("Fix:")[1], exc
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            else:
                assert not refused, "one flat rank among hierarchical ones was accepted"
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
        grad = torch.from_numpy(grads_for(11, rank))
        for attempt, hierarchical in enumerate((rank != 0, True)):  # the same name twice
            mixed = attempt == 0 and refused
            try:
                res = hvd.gtopk_allreduce(grad, density=0.05, name="hm",
                                          hierarchical=hierarchical)
            except PlanMismatchError as exc:
                assert mixed and "hierarchical" in str(exc), exc
            else:
                assert not mixed, "mixed modes were accepted"
                assert torch.isfinite(res.output).all()
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
    with rec("hierarchical_optimizer_refuses_what_it_cannot_run"):
        model = make_model(32)
        for kwargs in ({"algorithm": "topk"}, {"algorithm": "topk", "granularity": "layer"},
                       {"hierarchical": "yes"}):
            try:
                hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                         named_parameters=model.named_parameters(),
                                         **{"hierarchical": True, **kwargs})
            except ValueError as exc:
                assert "hierarchical" in str(exc), exc
            else:
                raise AssertionError(f"{kwargs} was accepted")


def join_scenario(rec, rank, size, local):
    with rec("hierarchical_join_with_uneven_data_equals_the_reference"):
        # odd ranks run out one batch early and join(): they take part with zeros, and what
        # their shard of the node's sum did not apply joins their residual (nothing is lost)
        batches = [2 + (r + 1) % 2 for r in range(size)]
        model = make_model(36)
        opt = hvd.DistributedOptimizer(momentum_sgd(model.parameters()),
                                       named_parameters=model.named_parameters(),
                                       density=0.1, hierarchical=True)
        ref = HierarchicalReference(model, momentum_sgd, size, 0.1, "model", local)
        loss, ref_loss = loss_for(36), loss_for(36)
        uneven_epoch(model, opt, ref, loss, ref_loss, batches, rank)
        last = hvd.join()  # a rank with the most batches
        assert batches[last] == max(batches), (last, batches)
        assert_equal(flat_params(model), flat_params(ref.model).numpy(), "after join")
        assert_equal(opt.gtopk_state.residuals["model"], ref.eps[0][rank], "residual")
        ref.joined = set()  # the next epoch: every rank again
        loss.step = ref_loss.step
        got = train(hvd, model, opt, loss, steps=1)[0]
        assert_equal(got, simulate(ref, ref_loss, steps=1)[0].numpy(), "next epoch")
        total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
        assert total.item() == size * (size - 1) / 2, total


def main():
    torch.set_num_threads(1)
    hvd.init(hierarchical=True)
    rank, size = hvd.rank(), hvd.size()
    layout = job_layout(hvd)
    local = layout.local_size  # 1 where the layout falls back to flat gTop-k
    rec = Recorder(rank)
    shards = shard_bounds(D, local)
    lo, hi = shards[rank % local]
    with rec("layout") as data:
        data["layout"] = (layout.nodes, layout.local_size, layout.mode)
    with rec("hierarchical_allreduce_equals_the_reference_every_step"):
        eps = torch.zeros(hi - lo)
        ref_eps = [np.zeros(shards[p % local][1] - shards[p % local][0], np.float32)
                   for p in range(size)]
        for t in range(3):
            grads = [grads_for(t, p) for p in range(size)]
            want = hierarchical_step(grads, ref_eps, local, 0.05)
            res = hvd.gtopk_allreduce(torch.from_numpy(grads[rank]), density=0.05,
                                      residual=eps, name="h", hierarchical=True)
            assert res.residual is eps
            assert_equal(res.output, want.dense(D) / size, f"output at step {t}")
            assert_equal(eps, want.residuals[rank], f"residual at step {t}")
            ref_eps = want.residuals
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
    with rec("hierarchical_nan_on_one_rank_gives_nan_everywhere_residuals_kept"):
        grad = torch.from_numpy(grads_for(9, rank))
        if rank == size - 1:
            grad[5] = float("nan")
        before = eps.clone()
        res = hvd.gtopk_allreduce(grad, density=0.05, residual=eps, name="h",
                                  hierarchical=True)
        assert not res.finite and torch.isnan(res.output).all(), res.output
        assert torch.equal(eps, before)
    with rec("hierarchical_density_1_is_the_dense_sum"):
        grads = [grads_for(10, p, integer=True) for p in range(size)]
        res = hvd.gtopk_allreduce(torch.from_numpy(grads[rank]), density=1.0, op=hvd.Sum,
                                  name="h1", hierarchical=True)
        assert_equal(res.output, np.sum(grads, axis=0), "density 1")
    with rec("hierarchical_bad_residual_is_refused_before_communicating"):
        try:
            hvd.gtopk_allreduce(torch.zeros(D), residual=torch.zeros(D + 1), name="h2",
                                hierarchical=True)
        except ValueError as exc:
            assert "residual" in str(exc), exc
        else:
            raise AssertionError("a residual of the wrong size was accepted")
    optimizer_scenarios(rec, rank, size, local)
    if layout.mode != "flat":  # flat, these are test_torch_robustness.py's own scenarios
        join_scenario(rec, rank, size, local)
        # bit-identical to the unscaled hierarchical run (powers of two scale exactly), and
        # an overflow on one rank skips the step on every rank with every shard residual finite
        loss_scaling(rec, rank, size, prefix="hierarchical_", hierarchical=True)
    rec.save()
    hvd.shutdown()


if __name__ == "__main__":
    main()
