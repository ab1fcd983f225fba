"""What a gTop-k ``DistributedOptimizer`` holds: the layout of its parameters into buffers,
the gradient hooks, and the synchronisation of one step.

The optimizer class (gtopk_hvd.torch.optimizer) carries only Horovod's method names; this
object, kept in its ``_gtopk_sync`` attribute, does the rest, so nothing collides with the
attributes of the user's optimizer class.  A synchronisation (``granularity="model"`` or
``"layer"``) is gtopk_hvd.common.step.run_step over :class:`~gtopk_hvd.torch.step.TorchStep`;
``granularity="bucket"`` starts the buckets' exchanges from the gradient hooks
(gtopk_hvd.torch.buckets) and finishes them in ``synchronize()`` with the same scatter and
residual update.
"""
import itertools
import logging
import weakref

import horovod.torch as hvd
import torch

from gtopk_hvd.common.buckets import make_buckets
from gtopk_hvd.common.collective import MISMATCH, NONFINITE
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.errors import GTopkError
from gtopk_hvd.common.plan import plan_digest
from gtopk_hvd.common.process_sets import (agree_on_mode, hierarchical_sets, is_elastic,
                                           prepare_exchange_sets)
from gtopk_hvd.common.step import (Buffer, StepConfig, apply_sparse, finish_exchanged,
                                   run_step, step_plan)
from gtopk_hvd.common.validation import check_buffer_numel
from gtopk_hvd.torch.buckets import BucketPipeline
from gtopk_hvd.torch.collective import dense_allreduce_bytes, measure_link
from gtopk_hvd.torch.hierarchical import gather_modes
from gtopk_hvd.torch.ops import all_finite
from gtopk_hvd.torch.step import JoinedStep, TorchStep

__all__ = ["Synchronizer", "STEP_KEY", "live_synchronizers"]

logger = logging.getLogger(__name__)

# the schedule step, also kept in param_groups[0]: the one place that Horovod's own
# broadcast_optimizer_state (and torch's load_state_dict) carries from rank 0 to every rank
STEP_KEY = "gtopk_step"

# every Synchronizer of this process, for join(); _order numbers creations and steps
_LIVE = []
_order = itertools.count()


def live_synchronizers():
    """The synchronizers a rank that joins takes part in, in the order they synchronise: those
    that synchronised since the previous synchronisation of the one that synchronised last
    (one optimizer, or several stepped in turn), or, where none synchronised yet on this
    rank, every live one in the order they were made."""
    _LIVE[:] = [ref for ref in _LIVE if ref() is not None and ref().optimizer is not None]
    syncs = sorted((ref() for ref in _LIVE), key=lambda sync: sync.order)
    stepped = [sync for sync in syncs if sync.previous_order is not None]
    if not stepped:
        return syncs
    since = max(stepped, key=lambda sync: sync.order).previous_order
    return [sync for sync in stepped if sync.order > since]


class _Layout:
    """Which parameters go into which sparsified buffer ((name, [params]) each), and which are
    reduced densely; ``bucket_of``: {parameter: its buffer's position}."""

    def __init__(self, params, names, granularity, dense_threshold, bucket_cap_mb):
        sparse = [p for p in params if p.numel() >= max(1, dense_threshold)]
        self.dense = [p for p in params if p.numel() < max(1, dense_threshold)]
        if granularity == "model":
            self.buffers = [("model", sparse)] if sparse else []
        elif granularity == "bucket":
            self.buffers = [(f"bucket.{b}", [sparse[i] for i in positions]) for b, positions
                            in enumerate(make_buckets([p.numel() for p in sparse],
                                                      bucket_cap_mb))]
        else:
            self.buffers = [(names[p], [p]) for p in sparse]
        self.bucket_of = {p: b for b, (_, ps) in enumerate(self.buffers) for p in ps}
        self.numels = [sum(p.numel() for p in ps) for _, ps in self.buffers]
        for (name, _), numel in zip(self.buffers, self.numels):
            check_buffer_numel(numel, name)
        self.key = tuple(id(p) for p in params)


class Synchronizer:
    """The gTop-k synchronisation of one optimizer's gradients (see the module docstring).

    Holds the :class:`~gtopk_hvd.torch.state.GTopkState` (``state``), the Horovod arguments,
    the count of backward passes per parameter, and whether this step was synchronised."""

    def __init__(self, optimizer, names, op, op_name, sparse_as_dense, state, grad_scaler,
                 predivide, compression, wire, bucket_cap_mb, hierarchical=False):
        self._optimizer = weakref.ref(optimizer)
        self.names, self.op, self.sparse_as_dense = names, op, sparse_as_dense
        self.state, self.grad_scaler, self.compression = state, grad_scaler, compression
        self.config = StepConfig(state.algorithm, op_name, state.granularity,
                                 state.dense_threshold, predivide, wire)
        self.bucket_cap_mb = bucket_cap_mb
        self.layout = None
        self.pipeline = None  # granularity='bucket': the step's BucketPipeline, once started
        self.passes = {}
        self.synchronized = False
        self.should_synchronize = True
        self._published_step = None
        self.joined = self.all_joined = False  # join(): this rank / every rank has joined
        self.order, self.previous_order = next(_order), None  # when made / last synchronised
        _LIVE.append(weakref.ref(self))
        self.publish_step()
        if self.config.sparse_algorithm == "gtopk":
            prepare_exchange_sets(hvd)  # collective registration; every check ran first
        # hierarchical gTop-k: (layout, process sets) of this world where it can run
        # (``nodes``, None where the layout falls back to flat) and of the step (``hierarchy``:
        # algorithm="auto" runs it only when the cost model says so)
        self.hierarchy = self.nodes = None
        self.hierarchical = hierarchical
        if hierarchical and not is_elastic():  # under Elastic: at each step (refresh_layout)
            layout, sets = hierarchical_sets(hvd)
            self.hierarchy = self.nodes = None if layout.mode == "flat" else (layout, sets)

    @property
    def optimizer(self):
        return self._optimizer()

    # the schedule step ---------------------------------------------------------------------

    def publish_step(self):
        """Keep the schedule step also in ``param_groups[0][STEP_KEY]``: a value written there
        from outside (a broadcast, a loaded state) is adopted."""
        group = self.optimizer.param_groups[0]
        seen = group.get(STEP_KEY)
        if seen is not None and seen != self._published_step:
            self.state.step = int(seen)
        group[STEP_KEY] = self._published_step = self.state.step

    def forget_published_step(self):
        self.optimizer.param_groups[0].pop(STEP_KEY, None)
        self._published_step = None

    # hooks ---------------------------------------------------------------------------------

    def register_hooks(self):
        this = weakref.ref(self)

        def hook(p):
            sync = this()
            if sync is not None:
                sync.count_backward_pass(p)
                if sync.state.granularity == "bucket" and sync.state.is_verified():
                    sync.bucket_hook(p)

        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(hook)

    def count_backward_pass(self, p):
        passes = self.passes[p] = self.passes.get(p, 0) + 1
        allowed = self.optimizer.backward_passes_per_step
        if passes > allowed:
            raise AssertionError(
                f"Gradients were computed {passes} times before step(), more than "
                f"backward_passes_per_step={allowed}. Increase backward_passes_per_step to "
                f"accumulate gradients locally.")

    def reset(self, pipeline_running_ok=True):
        """Forget the step in progress (zero_grad, a loaded state)."""
        if not pipeline_running_ok and self.pipeline is not None and self.pipeline.started:
            raise AssertionError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(): with granularity='bucket' the "
                "gradients are already being exchanged. Call step() (or synchronize()) first")
        self.pipeline = None
        self.passes.clear()

    # what a step is made of ----------------------------------------------------------------

    def params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]
                if p.requires_grad]

    def current_layout(self, params):
        if self.layout is None or self.layout.key != tuple(id(p) for p in params):
            missing = [p for p in params if p not in self.names]
            for i, p in enumerate(missing):  # added later with add_param_group
                self.names[p] = f"gtopk.noname.added.{i}.{len(self.names)}"
            state, before = self.state, self.layout
            self.layout = _Layout(params, self.names, state.granularity, state.dense_threshold,
                                  self.bucket_cap_mb)
            if before is not None:  # the trainable set changed: residuals follow parameters
                state.relayout(self.members(before), self.members(self.layout))
        return self.layout

    def members(self, layout):
        """[(buffer name, [(parameter name, numel)...])] of ``layout``."""
        return [(name, self.keys(ps)) for name, ps in layout.buffers]

    def buffers(self, layout, methods):
        """The step's :class:`~gtopk_hvd.common.step.Buffer` list: ``layout``'s buffers with
        their ``methods`` and their parameters' keys."""
        return [Buffer(name, ps, numel, method, self.keys(ps)) for (name, ps), numel, method
                in zip(layout.buffers, layout.numels, methods)]

    def keys(self, params):
        """(name, numel) of each parameter, for the plan: ranks whose parameters come in
        another order or under other names are refused."""
        return [(self.names[p], p.numel()) for p in params]

    def loss_scale(self):
        """The scale the gradients carry (GradScaler), 1.0 without one."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        per_opt = getattr(scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {})
        if getattr(per_opt.get("stage"), "name", "") == "UNSCALED":
            raise GTopkError(
                "the gradients were unscaled (scaler.unscale_ or scaler.step) before gTop-k "
                "synchronised them, so a rank whose gradients overflowed would skip the step "
                "alone. Use Horovod's pattern: scaler.scale(loss).backward(); "
                "optimizer.synchronize(); scaler.unscale_(optimizer); with "
                "optimizer.skip_synchronize(): scaler.step(optimizer); scaler.update()")
        return float(scaler.get_scale())

    def check_sparse(self, params):
        for p in params:  # before any communication
            if p.grad is not None and p.grad.is_sparse and not self.sparse_as_dense:
                raise ValueError(
                    f"parameter {self.names.get(p)!r} has a sparse gradient (for example "
                    f"nn.Embedding(sparse=True)); gTop-k works on dense buffers: pass "
                    f"sparse_as_dense=True or use a dense embedding")

    def dense_first(self):
        """Whether the dense allreduce goes first and carries the verdict: with
        algorithm='auto' once a first step, exchanged with headers, found every rank with the
        same plan; then a step with nothing to sparsify costs what Horovod's dense allreduce
        costs.  Not under Elastic, where a joining rank has had no first step."""
        return self.state.algorithm == "auto" and self.state.is_verified() and not is_elastic()

    def agree_on_mode(self):
        """In a job started with init(hierarchical=True), until a step verified the set-up:
        every rank runs the same mode (hierarchical or flat), or all refuse it."""
        if not self.state.is_verified():
            agree_on_mode(hvd, self.config.name, self.hierarchy is not None, gather_modes,
                          once=False)

    def refresh_layout(self):
        """Hierarchical gTop-k under Horovod Elastic, before a step's first operation: the
        layout of this world (its node and rail sets registered again after a reset, here
        where every rank is).  Returns (N, L) where hierarchical gTop-k can run, else None."""
        if not self.hierarchical:
            return None
        if is_elastic():
            layout, sets = hierarchical_sets(hvd)
            self.nodes = None if layout.mode == "flat" else (layout, sets)
        return None if self.nodes is None else (self.nodes[0].nodes, self.nodes[0].local_size)

    def step_methods(self, layout, dense_paid):
        """The step's methods per buffer (GTopkState.methods_for) and its mode: with
        ``algorithm="auto"`` and hierarchical=True, hierarchical gTop-k when the cost model
        prefers it on this world's nodes (gtopk_hvd.common.cost.hierarchical_choice).
        Returns the methods as the step runs them ('gtopk' for 'hierarchical')."""
        nodes, auto = self.refresh_layout(), self.state.algorithm == "auto"
        methods = self.state.methods_for([name for name, _ in layout.buffers], layout.numels,
                                         hvd.size(), hvd.rank(), dense_paid=dense_paid,
                                         nodes=nodes if auto else None)
        self.hierarchy = self.nodes if not auto or "hierarchical" in methods else None
        return ["gtopk" if m == "hierarchical" else m for m in methods]

    def refresh_hierarchy(self, buffers):
        """Hierarchical gTop-k, before a step's first operation: the part of each buffer this
        rank's residual covers (this rank's shard, or all of it where the step runs flat or
        sends the buffer densely), the residuals re-sharded where it moved (an Elastic
        reset, or ``algorithm="auto"`` switching modes: GTopkState.reshard)."""
        if not self.hierarchical:
            return
        rank = hvd.rank()
        self.state.reshard({b.name: (*self.hierarchy[0].shard(b.numel, rank), b.numel)
                            if self.hierarchy is not None and b.method != "dense"
                            else (0, b.numel, b.numel) for b in buffers})

    def backend(self, params):
        args = (self.state, self.config, params, self.compression, self.op, self.finish,
                self.hierarchy)
        return JoinedStep(self, *args) if self.joined else TorchStep(*args)

    # the step ------------------------------------------------------------------------------

    def synchronize(self):
        if not self.joined:
            self.previous_order, self.order = self.order, next(_order)
        params = self.params()
        if self.state.granularity == "bucket":
            self.synchronize_buckets(params)
        else:
            self.check_sparse(params)
            layout = self.current_layout(params)
            self.publish_step()
            state = self.state
            density, scale = state.density(), self.loss_scale()
            # the dense allreduce runs every step (it carries the verdict): its rounds are paid
            methods = self.step_methods(layout, dense_paid=True)
            buffers = self.buffers(layout, methods)
            ks = [k_for(b.numel, density) for b in buffers if b.method != "dense"]
            dense = [(self.names[p], p, p.numel()) for p in layout.dense]
            self.refresh_hierarchy(buffers)
            self.agree_on_mode()
            run_step(self.backend(params), self.config, buffers, dense, ks, density, scale,
                     dense_first=self.dense_first())
        if self.state.algorithm == "auto" and self.state.link is None:
            # every rank got here with the same verdict, so with the same plan: measure now
            node = None if self.nodes is None else self.nodes[1][
                self.nodes[0].node(hvd.rank())]
            self.state.link = measure_link("gtopk.link", node_set=node,
                                           local_size=hvd.local_size())

    # join() ------------------------------------------------------------------------------

    def synchronize_joined(self):
        """One step of the others, on a rank that joined (zeros, JOINED, nothing applied);
        True when every rank has joined."""
        self.joined, self.all_joined = True, False
        try:
            self.synchronize()
        finally:
            self.joined, self.synchronized = False, False
        return self.all_joined

    def adopt_from(self, root_rank):
        """After join(): the parameters, the optimizer's state and the loss scaler's state of
        ``root_rank`` (a rank that took part in every step) on every rank; the residuals stay
        each rank's own."""
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        hvd.broadcast_parameters([(self.names.get(p, f"gtopk.join.{i}"), p)
                                  for i, p in enumerate(params)], root_rank=root_rank)
        hvd.broadcast_optimizer_state(opt, root_rank=root_rank)
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(hvd.broadcast_object(
                self.grad_scaler.state_dict(), root_rank=root_rank, name="gtopk.join.scaler"))
        self.publish_step()

    def finish(self, finite, stats):
        """A synchronisation is done: statistics and the schedule step (finite), or the count
        of non-finite steps, residuals and schedule step as they were."""
        state = self.state
        state.mark_verified()  # the verdict reached every rank: the set-ups agree
        if finite:
            state.step += 1
            self.publish_step()
            state.last = dict(stats, finite=True)
        else:
            state.nonfinite_steps += 1
            state.last = dict(state.last, finite=False, bytes_sent=0)
            # with loss scaling an overflow now and then is the scaler's business
            log = logger.info if self.grad_scaler is not None else logger.warning
            log("gtopk_hvd: non-finite gradients on some rank in synchronisation %d: every "
                "rank gets NaN gradients, residuals and the density schedule's step (%d) are "
                "kept (%d such synchronisations so far)", state.step + state.nonfinite_steps,
                state.step, state.nonfinite_steps)
        self.passes.clear()
        self.synchronized = True

    # granularity='bucket' ------------------------------------------------------------------

    def bucket_hook(self, p):
        """A gradient is complete: its bucket may be, and the exchanges advance as far as they
        can without waiting."""
        if self.passes[p] != self.optimizer.backward_passes_per_step:
            return
        try:
            if self.pipeline is None:
                self.pipeline = self.start_pipeline()
            bucket = self.pipeline.layout.bucket_of.get(p)
            if bucket is not None:
                self.pipeline.arrived(bucket)
            self.pipeline.advance(block=False)
        except BaseException:
            self.pipeline = None  # nothing of a failed step carries over
            raise

    def start_pipeline(self):
        """This step's BucketPipeline: the plan of every bucket, fixed at its first gradient
        (the loss scale and the density do not change within a backward pass)."""
        state, layout, config = self.state, self.current_layout(self.params()), self.config
        self.publish_step()
        density, scale = state.density(), self.loss_scale()
        ks = [k_for(numel, density) for numel in layout.numels]
        buffers = self.buffers(layout, ["gtopk"] * len(layout.buffers))
        plan = step_plan(config, buffers, ks, [(self.names[p], p, p.numel())
                                               for p in layout.dense], scale)
        self.refresh_layout()
        self.hierarchy = self.nodes  # buckets run gTop-k ('auto' is not offered there)
        self.refresh_hierarchy(buffers)
        self.agree_on_mode()
        backend = self.backend(self.params())

        def prepare(bucket):
            if not layout.buffers:  # the verdict and the digest still travel
                return torch.zeros(0, dtype=torch.float32), 0, 0, None
            self.check_sparse(buffers[bucket].members)
            acc = backend.compensate(buffers[bucket], scale, config.predivide)
            if self.hierarchy is None:
                return acc, ks[bucket], backend.nonfinite_flag([acc]), None
            eps = backend.shard_terms[-1]  # this rank's shard residual, added after the sum
            return acc, k_for(eps.numel(), density), backend.nonfinite_flag([acc]), eps

        pipe = BucketPipeline([len(ps) for _, ps in layout.buffers] or [0], prepare,
                              plan_digest(plan), config.wire, hierarchy=self.hierarchy)
        pipe.layout, pipe.plan, pipe.density, pipe.scale = layout, plan, density, scale
        pipe.buffers, pipe.ks = buffers, ks
        return pipe

    def synchronize_buckets(self, params):
        """Finish the exchanges the backward pass started (all of them on the first step),
        then the dense allreduce; apply only if every bucket and the dense part are finite on
        every rank (steps 4 and 5 of gtopk_hvd.common.step, as run_step does them)."""
        pipe, self.pipeline = self.pipeline, None
        if pipe is None:
            self.check_sparse(params)  # before any communication
            pipe = self.start_pipeline()
            pipe.advance(block=True)
        else:
            try:  # what the hooks could not see: unscaled since, a sparse gradient
                self.loss_scale()
                self.check_sparse(params)
            finally:  # the ranks' hooks went more or less far along one order: finish it on
                # every rank alike, so that no operation is left without its partner
                pipe.advance(block=True)
        backend, layout, verdict = self.backend(params), pipe.layout, pipe.verdict
        if self.hierarchy is not None and pipe.buffers:
            backend.split_bytes(pipe.results)
        dense_numel = sum(p.numel() for p in layout.dense)
        flat = None
        if layout.dense and not verdict & MISMATCH:  # the digest covered the dense sizes
            flat = backend.dense_allreduce(backend.flat_grads(layout.dense))
            verdict |= 0 if all_finite([flat]) else NONFINITE  # the same bits on every rank
        finite = backend.check_verdict(verdict, pipe.plan, pipe.ks, None)
        k_total = numel = sent = 0
        if finite:
            k_total, numel, sent = apply_sparse(backend, pipe.buffers, pipe.accs, pipe.ks,
                                                pipe.results, pipe.scale,
                                                self.config.predivide, finite)
            if layout.dense:
                backend.write_dense(layout.dense, flat)
                sent += dense_allreduce_bytes(dense_numel, hvd.size())
        backend.nonfinite(finite)
        finish_exchanged(backend, finite, pipe.density, k_total, numel, dense_numel, sent,
                         pipe.scale)
