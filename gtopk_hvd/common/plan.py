"""What a rank will exchange in one step (its *plan*), its digest, and the error when ranks
disagree.

Every exchange header carries the 29-bit digest of the sender's plan (gtopk_hvd.common
.collective); a receiver whose own digest differs raises the MISMATCH flag, which reaches every
rank by the end of the step's first exchange.  Then, and only then, every rank gathers the
full plans (one allgather_object) and raises :class:`PlanMismatchError` naming the first
difference and the ranks that differ: a set-up that disagrees is refused, never a hang or a
silent divergence.

A plan is a dict of plain values; ``buffers`` lists (name, numel, k) per sparsified buffer in
exchange order, ``dense`` (name, numel) per tensor reduced densely.
"""
import logging
import zlib

from gtopk_hvd.common.collective import DIGEST_BITS
from gtopk_hvd.common.errors import GTopkError

__all__ = ["PlanMismatchError", "make_plan", "plan_digest", "first_difference",
           "mismatch_error", "hierarchy_mismatch"]

logger = logging.getLogger(__name__)


class PlanMismatchError(GTopkError):
    """Ranks disagree on what they exchange (density, parameters, granularity, ...)."""


def make_plan(algorithm, op, granularity, dense_threshold, buffers, dense=(), loss_scale=1.0,
              gradient_predivide_factor=1.0, wire="float32", members=None):
    """The plan of one step: everything every rank must agree on.  ``members``: (name, numel)
    of every tensor of the sparsified buffers, in buffer order, where the adapter knows the
    names (a model whose parameters come in another order, with the same sizes, is refused
    too)."""
    plan = {"algorithm": algorithm, "op": op, "granularity": granularity, "wire": wire,
            "dense_threshold": int(dense_threshold), "loss_scale": float(loss_scale),
            "gradient_predivide_factor": float(gradient_predivide_factor),
            "buffers": [(str(n), int(d), int(k)) for n, d, k in buffers],
            "dense": [(str(n), int(d)) for n, d in dense]}
    if members is not None:
        plan["members"] = [(str(n), int(d)) for n, d in members]
    return plan


def plan_digest(plan):
    """A 29-bit digest of ``plan`` (CRC-32 of its repr), the same on every rank."""
    return zlib.crc32(repr(plan).encode()) & ((1 << DIGEST_BITS) - 1)


def first_difference(a, b):
    """(field, value in a, value in b) of the first difference between two plans, or None."""
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list):
            for i in range(max(len(va), len(vb))):
                ea = va[i] if i < len(va) else None
                eb = vb[i] if i < len(vb) else None
                if ea != eb:
                    return f"{key}[{i}]", ea, eb
        return key, va, vb
    return None


def mismatch_error(plans, rank):
    """The :class:`PlanMismatchError` every rank raises, given every rank's plan."""
    reference = plans[0]
    differing = [r for r, p in enumerate(plans) if first_difference(reference, p) is not None]
    if not differing:  # digests differed but the plans read the same: should not happen
        return PlanMismatchError("gTop-k ranks disagreed on their plan digests although their "
                                 "plans read the same; please report this")
    r = differing[0]
    field, want, got = first_difference(reference, plans[r])
    hint = {
        "buffers": "every rank must build the optimizer with the same parameters, in the same "
                   "order and shapes, and the same density (or density schedule and step)",
        "dense": "every rank must pass the same dense_threshold and parameters",
        "members": "every rank must give the optimizer the same parameters in the same order "
                   "(named_parameters=model.named_parameters() names them); build the model "
                   "and the optimizer the same way on every rank",
        "hierarchical": "pass the same hierarchical= to the optimizer (or gtopk_allreduce) on "
                        "every rank; the two modes exchange in different process sets",
        "loss_scale": "pass grad_scaler= (PyTorch) or the LossScaleOptimizer (TensorFlow) on "
                      "every rank or on none, and keep the scalers in step",
    }.get(field.split("[")[0], f"pass the same {field.split('[')[0]} on every rank")
    return PlanMismatchError(
        f"gTop-k set-ups differ across ranks (seen on rank {rank}): rank {r} has "
        f"{field}={got!r} where rank 0 has {want!r} (ranks that differ from rank 0: "
        f"{differing}). Fix: {hint}. Nothing was applied in this step.")


def hierarchy_mismatch(modes, rank):
    """None when every rank runs the same mode, else the :class:`PlanMismatchError` every rank
    raises; ``modes``: each rank's 1 (hierarchical gTop-k) or 0 (flat), gathered.  Checked
    before the first exchange of a job started with ``init(hierarchical=True)``: the two
    modes' first operations run in different process sets, so their headers never meet."""
    plans = [{"hierarchical": bool(m)} for m in modes]
    if all(p == plans[0] for p in plans):
        return None
    return mismatch_error(plans, rank)
