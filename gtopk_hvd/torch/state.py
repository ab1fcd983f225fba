"""The gTop-k optimizer's state: hyperparameters, residuals (error feedback) and statistics.

Kept apart from the optimizer so it can be checkpointed on its own (``state_dict`` /
``load_state_dict``).  Policy for the per-rank residuals at load time
(gtopk_hvd.common.validation.check_world_size_on_load): they are kept when the checkpoint
was written by the same rank of a world of the same size with the same layout (flat, or
hierarchical N x L: check_layout_on_load), otherwise dropped with a warning (training goes on;
only the not-yet-applied residual mass is lost).  The schedule step is
always restored, so density schedules continue where they stopped.
"""
import logging
from collections import Counter

import torch

from gtopk_hvd.common.cost import as_link, logged_methods
from gtopk_hvd.common.density import as_schedule
from gtopk_hvd.common.validation import (check_algorithm, check_granularity,
                                         check_layout_on_load, check_non_negative_int,
                                         check_world_size_on_load)

__all__ = ["GTopkState"]

logger = logging.getLogger(__name__)

_FORMAT = 1


class GTopkState:
    """Everything a gTop-k optimizer keeps between steps.

    Hyperparameters: ``schedule`` (density per synchronisation step), ``algorithm``,
    ``granularity``, ``dense_threshold``.
    Internal state: ``step`` (finite synchronisations done: the density schedule's clock),
    ``residuals`` ({buffer name: flat float32 tensor}, this rank's error feedback, in unscaled
    units) and one spare buffer per residual: a step computes acc = grad + scale * residual
    into the spare, so that a non-finite step can keep the residual as it was; a finite step
    swaps the two.  Residuals thus take twice their size in memory.
    Statistics: ``last`` (density, k, numel, bytes_sent, dense_bytes of the last step) and
    ``nonfinite_steps`` (steps skipped because some rank's gradients were not finite).
    ``algorithm="auto"``: ``link`` (a :class:`~gtopk_hvd.common.cost.Link`, measured once
    or given) and ``methods`` ({buffer name: method} of the last step).
    """

    def __init__(self, density, algorithm="gtopk", granularity="model", dense_threshold=0,
                 link=None):
        self.schedule = as_schedule(density)
        self.algorithm = check_algorithm(algorithm, auto=True)
        self.link = as_link(link)
        self.methods = {}
        self.granularity = check_granularity(granularity, bucket=True)
        self.dense_threshold = check_non_negative_int(dense_threshold, "dense_threshold")
        self.step = 0
        self.residuals = {}
        self.spares = {}
        self.nonfinite_steps = 0
        self.last = {}
        self.parked = {}  # {parameter name: residual} of parameters frozen for now
        # hierarchical gTop-k: {buffer name: (lo, hi, numel)}, the part of the buffer its
        # residual covers (this rank's shard; flat: all of it), and {buffer name: a
        # buffer-sized tensor}, residual mass a layout change left outside that part
        self.placements = {}
        self.carry = {}
        self._said = None  # what algorithm='auto' chose, as logged last
        self._verified = False

    def methods_for(self, names, numels, size, rank, dense_paid, nodes=None):
        """Per buffer, the method of the coming step (gtopk_hvd.common.cost.buffer_methods;
        ``nodes``: (N, L) where hierarchical gTop-k may run), recorded in ``methods`` and
        logged once per change on rank 0."""
        density = self.density() if self.algorithm == "auto" else None  # only 'auto' reads it
        methods, self._said = logged_methods(self.algorithm, numels, density, size, self.link,
                                             dense_paid, rank, self._said, nodes=nodes)
        self.methods = dict(zip(names, methods))
        return methods

    def mark_verified(self):
        """Note that a step found every rank with the same plan (then, with
        ``algorithm="auto"``, the dense allreduce may carry the verdict)."""
        self._verified = True

    def is_verified(self):
        """Whether a step found every rank with the same plan."""
        return self._verified

    def density(self):
        """The density of the coming synchronisation step."""
        return self.schedule(self.step)

    def residual(self, name, numel, device):
        """The residual of buffer ``name`` (zeros the first time or if its size changed)."""
        eps = self.residuals.get(name)
        if eps is not None and eps.numel() != numel:
            logger.warning("gtopk_hvd: buffer %r changed size from %d to %d: its residual "
                           "starts again from zero", name, eps.numel(), numel)
            eps = None
        if eps is None:
            eps = self.residuals[name] = torch.zeros(numel, dtype=torch.float32, device=device)
        elif eps.device != torch.device(device):
            eps = self.residuals[name] = eps.to(device)
        return eps

    def relayout(self, old, new):
        """The set of parameters changed (frozen, unfrozen, added): carry each parameter's
        share of the residuals from the ``old`` buffers to the ``new`` ones, both lists of
        (buffer name, [(parameter name, numel)...]).  A parameter that left keeps its share
        aside (``parked``, not checkpointed) and gets it back when it returns; one that is
        new starts from zero.  Nothing another parameter held back is lost."""
        pieces = dict(self.parked)
        for name, members in old:
            eps = self.residuals.pop(name, None)
            self.spares.pop(name, None)
            if eps is None or eps.numel() != sum(n for _, n in members):
                continue
            offset = 0
            for member, n in members:
                pieces[member] = eps[offset:offset + n]
                offset += n
        for name, members in new:
            parts = [pieces.pop(member, None) for member, _ in members]
            known = [part for part in parts if part is not None]
            if known:
                self.residuals[name] = torch.cat([
                    torch.zeros(n, dtype=torch.float32, device=known[0].device)
                    if part is None else part for part, (_, n) in zip(parts, members)])
        self.parked = {member: eps.clone() for member, eps in pieces.items()}

    def reshard(self, placements):
        """Hierarchical gTop-k under Horovod Elastic: a reset changed the layout, so the part
        of a buffer this rank's residual covers (``placements``: {buffer name: (lo, hi,
        numel)}, this rank's shard, or all of the buffer where the layout runs flat) moved.
        Each residual is laid into its buffer at its old place; the new part becomes the
        residual, and what lies outside it is carried (``carry``) into the gradients of the
        next step that applies, where the node's reduce-scatter adds it to the shard of
        whichever rank now owns it: nothing is lost.  A buffer seen for the first time only
        records its place."""
        for name, place in placements.items():
            old = self.placements.get(name)
            eps = self.residuals.get(name)
            carried = self.carry.get(name)
            if old == place and (carried is None or place[1] - place[0] != place[2]):
                continue  # (a whole-buffer residual takes a pending carry in at once)
            self.placements[name] = place
            lo, hi, numel = place
            if old is None or old[2] != numel or (eps is not None and
                                                  eps.numel() != old[1] - old[0]):
                continue  # another buffer now: its residual's size decides (residual())
            if eps is None and carried is None:
                continue  # nothing held back
            device = eps.device if eps is not None else carried.device
            full = torch.zeros(numel, dtype=torch.float32, device=device)
            if eps is not None:
                full[old[0]:old[1]] = eps
            if carried is not None:
                full += self.carry.pop(name)
            self.residuals[name] = full[lo:hi].clone()
            self.spares.pop(name, None)
            full[lo:hi] = 0
            if bool(full.any()):
                self.carry[name] = full
            logger.info("gtopk_hvd: buffer %r: the residual now covers entries %d..%d of %d "
                        "(before %d..%d); the rest joins the next step's gradients",
                        name, lo, hi, numel, old[0], old[1])

    def spare(self, name, numel, device):
        """The buffer a step computes acc into for buffer ``name`` (not checkpointed)."""
        buf = self.spares.get(name)
        if buf is None or buf.numel() != numel or buf.device != torch.device(device):
            buf = self.spares[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    def commit(self, name, acc):
        """``acc`` (updated into the new residual) becomes the residual; the old residual's
        memory becomes the spare."""
        old = self.residuals.get(name)
        self.residuals[name] = acc
        if old is not None and old is not acc:
            self.spares[name] = old
        else:
            self.spares.pop(name, None)

    def residual_norm(self):
        total = sum(float(eps.double().pow(2).sum())
                    for eps in list(self.residuals.values()) + list(self.carry.values()))
        return total ** 0.5

    def gtopk_stats(self):
        """Statistics of the last synchronisation on this rank.

        density / k: of the last step (k summed over the buffers); numel: sparsified entries;
        dense_numel: entries reduced densely (below ``dense_threshold``); bytes_sent: bytes
        this rank sent; dense_bytes: what a dense ring allreduce of all gradients would send,
        2(P-1)/P * 4d; finite: whether the last step was finite on every rank; loss_scale:
        the loss scale the last step's gradients carried; step: finite synchronisations so
        far; nonfinite_steps: steps in which some rank's gradients were not finite (nothing
        applied, residuals kept); residual_norm: L2 norm of the residuals.  With
        ``algorithm="auto"`` also methods ({method: number of buffers} of the last step) and
        link (alpha, beta, select, overhead in seconds; None before it is measured).
        """
        stats = {"density": self.density(), "k": 0, "numel": 0, "dense_numel": 0,
                 "bytes_sent": 0, "dense_bytes": 0, "finite": True, "loss_scale": 1.0}
        stats.update(self.last)
        stats["step"] = self.step
        stats["nonfinite_steps"] = self.nonfinite_steps
        stats["residual_norm"] = self.residual_norm()
        if self.algorithm == "auto":
            stats["methods"] = dict(Counter(self.methods.values()))
            stats["link"] = None if self.link is None else dict(vars(self.link))
        return stats

    def state_dict(self, size, rank, layout=None):
        """Copies of the residuals (the optimizer updates them in place every step), the
        schedule step, and the world and layout (``common.validation.layout_key``) that wrote
        them."""
        return {"format": _FORMAT, "step": self.step, "world_size": size, "rank": rank,
                "algorithm": self.algorithm, "granularity": self.granularity, "layout": layout,
                "residuals": {name: eps.detach().clone() for name, eps in self.residuals.items()},
                "carry": {name: c.detach().clone() for name, c in self.carry.items()}}

    def load_state_dict(self, state, size, rank, layout=None):
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a gtopk_hvd optimizer state: expected the 'gtopk' entry of "
                             "DistributedOptimizer.state_dict()")
        self.step = int(state["step"])
        self.residuals = {}
        self.spares = {}
        self.placements, self.carry = {}, {}  # the next step records its place again
        if not check_world_size_on_load(state.get("world_size"), state.get("rank"), size, rank):
            return
        if not check_layout_on_load(state.get("layout"), layout):
            return
        if state.get("granularity", self.granularity) != self.granularity:
            logger.warning("gtopk_hvd: checkpoint used granularity=%r, now %r: dropping the "
                           "saved residuals", state.get("granularity"), self.granularity)
            return
        self.residuals = {name: eps.detach().to(torch.float32).clone()
                          for name, eps in state.get("residuals", {}).items()}
        self.carry = {name: c.detach().to(torch.float32).clone()
                      for name, c in state.get("carry", {}).items()}

    def __repr__(self):
        return (f"GTopkState(schedule={self.schedule!r}, algorithm={self.algorithm!r}, "
                f"granularity={self.granularity!r}, dense_threshold={self.dense_threshold}, "
                f"link={self.link!r})")
