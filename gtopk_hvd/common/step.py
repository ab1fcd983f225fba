"""One gTop-k synchronisation, written once for both frameworks and every optimizer.

:func:`run_step` is the step of ALGORITHM.md ("One step on worker p") over a model's
gradients, as the PyTorch ``DistributedOptimizer`` and the TensorFlow tape and Keras
optimizer run it; the adapter hands it a :class:`StepBackend` (its tensor operations, its
Horovod calls and where its gradients and residuals live).  On every rank:

1. compensate: acc_b = (g_b + S * eps_b) / f for every sparsified buffer b (S the loss scale
   the gradients carry, f Horovod's ``gradient_predivide_factor``); a buffer that
   ``algorithm="auto"`` sends densely goes to the dense allreduce as g_b + S * eps_b;
2. plan and verdict: the plan every rank must agree on (gtopk_hvd.common.plan), its digest,
   and this rank's NONFINITE flag;
3. exchange: the sparse buffers by gTop-k (all buffers' sets of a stage in one allgather,
   ``{name}.0.s<stage>``) or Top-k (``{name}.<i>``), then one dense allreduce
   (``{name}.dense``) when tensors go dense.  The first operation carries every rank's
   verdict to every rank: the first exchange's headers, or, once a step verified the
   set-ups (``dense_first``), the dense allreduce's tail.  Ranks that disagree raise
   PlanMismatchError together; a non-finite step ends here on every rank (eagerly; in a
   graph the rest runs and is discarded), with NaN gradients and every residual kept;
4. residual and scatter: eps_b = (acc_b with what reached the result cleared) * f / S; the
   global set divided by P into the gradients, the dense result into the dense ones; a
   buffer sent densely is applied in full, so its residual is cleared;
5. statistics: k, bytes sent, dense equivalent, loss scale, handed to the state.

Every rank issues the same operations in the same order whatever its data: what decides an
operation (the plan, the verdict) is the same on every rank, or the step is refused.
"""
import logging

from gtopk_hvd.common.collective import VERDICT_TAIL, dense_allreduce_bytes
from gtopk_hvd.common.plan import make_plan

__all__ = ["Buffer", "StepBackend", "StepConfig", "run_step", "step_plan", "apply_sparse",
           "finish_exchanged", "AppliesNothing"]

logger = logging.getLogger(__name__)


class Buffer:
    """One buffer of a step: ``name`` (keys its residual and the plan), ``members`` (the
    adapter's parameters or variables laid end to end), ``numel``, ``method``: 'gtopk' /
    'topk' (sparsified) or 'dense' (``algorithm="auto"`` sends it densely), and ``keys``:
    (name, numel) of each member, for the plan, where the adapter names them."""

    def __init__(self, name, members, numel, method, keys=None):
        self.name, self.members, self.numel, self.method = name, members, int(numel), method
        self.keys = keys

    def __repr__(self):
        return f"Buffer({self.name!r}, numel={self.numel}, method={self.method!r})"


class StepConfig:
    """What a step is configured with: ``algorithm`` as the user gave it ('gtopk', 'topk',
    'auto'), ``op`` ('Average' or 'Sum'), ``granularity``, ``dense_threshold``,
    ``predivide`` (gradient_predivide_factor), ``wire`` ('float32' / 'float16') and ``name``
    (prefix of the Horovod operation names)."""

    def __init__(self, algorithm, op, granularity, dense_threshold, predivide=1.0,
                 wire="float32", name="gtopk"):
        self.algorithm, self.op, self.granularity = algorithm, op, granularity
        self.dense_threshold, self.predivide = int(dense_threshold), float(predivide)
        self.wire, self.name = wire, name

    @property
    def sparse_algorithm(self):
        """How sparsified buffers travel: 'auto' sends them by gTop-k (Top-k never costs
        less)."""
        return "gtopk" if self.algorithm == "auto" else self.algorithm


class StepBackend:
    """What an adapter provides to :func:`run_step` (gtopk_hvd.torch.step,
    gtopk_hvd.tensorflow.step).  ``finite`` is a Python bool eagerly and a bool tensor in a
    TensorFlow graph; ``flags``, ``digest`` and ``k`` likewise an int or an int32 tensor.

    size: the world size.
    compensate(buffer, scale, predivide): acc = (g + scale * eps) / predivide, flat float32;
        the residual itself stays as it was (a non-finite step keeps it).
    flat_grads(members): the members' gradients laid end to end, float32 (zero where a
        member has no gradient on this rank).
    concat(parts): flat tensors laid end to end.
    nonfinite_flag(tensors): NONFINITE if some entry is NaN or Inf, else 0.
    digest(plan, ks, runtime_scale): the plan's digest, with ks and the loss scale that are
        only known at run time (tensors) folded in.
    check_verdict(verdict, plan, ks, runtime_scale): raise PlanMismatchError on every rank
        when the verdict says the set-ups differ; else whether the step is finite.
    after_verdict(finite, tensor): ``tensor``, computed only once ``finite`` is known.
    exchange(accs, ks, algorithm, name, digest, flags, wire): one ExchangeResult per buffer
        (gTop-k: all buffers in one exchange; Top-k: one buffer).
    empty(): a zero-length float32 tensor (a header-only exchange).
    dense_allreduce(flat): Horovod's allreduce of the dense parts (op, predivide, wire).
    dense_allreduce_with_verdict(parts, digest, flags): (flat, verdict), the dense allreduce
        carrying the verdict tail (gtopk_hvd.common.collective.allreduce_with_verdict).
    commit(buffer, acc, result, carried, finite): the buffer's new residual, acc with what
        reached the result cleared, divided by ``carried`` (the factor acc carries: loss
        scale over predivide factor), kept only on a finite step.  Called before
        ``write_sparse``, which may then reuse acc's memory.
    write_sparse(buffer, result, finite): the buffer's gradients = the global set over P
        (times predivide).
    write_dense(members, flat): the members' gradients = ``flat`` laid end to end.
    clear_residual(buffer, finite): a buffer applied in full keeps nothing back.
    nonfinite(finite): every gradient becomes NaN where the step is not finite.
    finish(finite, stats): record the step (schedule step, statistics, verified set-ups).
    """


class AppliesNothing:
    """Mixed into a backend whose rank called ``join()`` (gtopk_hvd.torch.step.JoinedStep,
    gtopk_hvd.tensorflow.step.JoinedTFStep): it takes part in every operation with zeros,
    but step 4 writes no gradient and no residual (its residuals are kept for later) and a
    non-finite step leaves its gradients alone."""

    def commit(self, buffer, acc, result, carried, finite):
        pass

    def write_sparse(self, buffer, result, finite):
        pass

    def write_dense(self, members, flat):
        pass

    def clear_residual(self, buffer, finite):
        pass

    def nonfinite(self, finite):
        pass


def run_step(backend, config, buffers, dense, ks, density, scale=1.0, runtime_scale=None,
             dense_first=False):
    """Synchronise one step's gradients on this rank (the numbered steps of this module).

    Args:
        backend: the adapter's :class:`StepBackend`.
        config: the :class:`StepConfig`.
        buffers: the :class:`Buffer` list of the layout (sparsified ones and those 'auto'
            sends densely), in exchange order.
        dense: the members below ``dense_threshold``: (name, member, numel) each.
        ks: k per sparsified buffer (Python ints, or int32 tensors in a graph).
        density: the step's density (for the statistics).
        scale: the loss scale the gradients carry (a float, or a float32 tensor with
            ``runtime_scale`` the same tensor, known only at run time).
        dense_first: the dense allreduce goes first and carries the verdict (only once a
            step verified that every rank has the same plan).

    Returns:
        Whether the step is finite on every rank (a bool, or a bool tensor in a graph).
    """
    size, predivide = backend.size, config.predivide
    sparse = [b for b in buffers if b.method != "dense"]
    chosen_dense = [b for b in buffers if b.method == "dense"]  # what "auto" sends densely
    # 1. compensate
    accs = [backend.compensate(b, scale, predivide) for b in sparse]
    chosen_dense_parts = [backend.compensate(b, scale, 1.0) for b in chosen_dense]
    dense_members = [m for _, m, _ in dense] + [m for b in chosen_dense for m in b.members]
    dense_numel = sum(n for _, _, n in dense) + sum(b.numel for b in chosen_dense)
    dense_parts = ([backend.flat_grads([m for _, m, _ in dense])] if dense else []) + \
        chosen_dense_parts
    # 2. plan and verdict
    plan = step_plan(config, buffers, ks, dense, scale if runtime_scale is None else 1.0)
    digest = backend.digest(plan, ks, runtime_scale)
    flags = backend.nonfinite_flag(accs + dense_parts)
    # 3. exchange: the first operation carries the verdict
    finite, sent, flat = True, 0, None
    if dense_first:
        flat, verdict = backend.dense_allreduce_with_verdict(dense_parts, digest, flags)
        finite = backend.check_verdict(verdict, plan, ks, runtime_scale)
        sent += dense_allreduce_bytes(dense_numel + VERDICT_TAIL, size)
    results = []
    if finite is not False and (sparse or flat is None):
        results, finite = _exchange(backend, config, plan, accs or [backend.empty()],
                                    ks if sparse else [0], digest, flags, runtime_scale, finite)
    k_total, numel = 0, 0
    if finite is False:  # eagerly: every rank skips the rest alike
        backend.nonfinite(finite)
        finish_exchanged(backend, finite, density, k_total, numel, dense_numel, sent, scale)
        return finite
    # 4. residual and scatter
    k_total, numel, bytes_sent = apply_sparse(backend, sparse, accs, ks, results, scale,
                                              predivide, finite)
    sent += bytes_sent
    if dense_members:
        if flat is None:
            flat = backend.dense_allreduce(backend.after_verdict(finite,
                                                                 backend.concat(dense_parts)))
            sent += dense_allreduce_bytes(dense_numel, size)
        backend.write_dense(dense_members, flat[:dense_numel])
        for buffer in chosen_dense:  # applied in full: nothing left to feed back
            backend.clear_residual(buffer, finite)
    backend.nonfinite(finite)
    # 5. statistics
    finish_exchanged(backend, finite, density, k_total, numel, dense_numel, sent, scale)
    return finite


def apply_sparse(backend, buffers, accs, ks, results, scale, predivide, finite):
    """Step 4 for the sparsified buffers: each one's new residual (acc with what reached the
    result cleared, back in unscaled units), then its gradients from the global set.
    Returns (k, entries, bytes sent) summed over the buffers."""
    carried = scale / predivide if predivide != 1.0 else scale  # what acc is scaled by
    k_total, numel = 0, 0
    for buffer, acc, k, result in zip(buffers, accs, ks, results):
        backend.commit(buffer, acc, result, carried, finite)  # first: it reads acc
        backend.write_sparse(buffer, result, finite)
        k_total, numel = k_total + k, numel + buffer.numel
    return k_total, numel, sum(r.bytes_sent for r in results)


def step_plan(config, buffers, ks, dense, scale):
    """The plan of a step (gtopk_hvd.common.plan.make_plan): the sparsified buffers with
    their k (-1 where k is a tensor, known at run time), the dense members and the buffers
    sent densely, every member's key where the adapter names them, the loss scale."""
    sparse = [b for b in buffers if b.method != "dense"]
    members = None
    if buffers and all(b.keys is not None for b in buffers):
        members = [key for b in buffers for key in b.keys]
    return make_plan(config.algorithm, config.op, config.granularity, config.dense_threshold,
                     [(b.name, b.numel, k if isinstance(k, int) else -1)
                      for b, k in zip(sparse, ks)],
                     [(n, numel) for n, _, numel in dense]
                     + [(b.name, b.numel) for b in buffers if b.method == "dense"],
                     scale, config.predivide, config.wire, members=members)


def finish_exchanged(backend, finite, density, k, numel, dense_numel, sent, scale):
    """Step 5: hand the step's statistics to the backend (``finish``)."""
    backend.finish(finite, {"density": density, "k": k, "numel": numel,
                            "dense_numel": dense_numel, "bytes_sent": sent, "loss_scale": scale,
                            "dense_bytes": dense_allreduce_bytes(numel + dense_numel,
                                                                 backend.size)})


def _exchange(backend, config, plan, accs, ks, digest, flags, runtime_scale, finite):
    """The sparse exchanges of step 3; (results, finite).  gTop-k sends every buffer in one
    exchange; Top-k one exchange per buffer, each after the first issued only once the first
    one's verdict is known (a rank whose set-up differs must not issue one more).  The
    headers carry the verdict also after a dense allreduce carried it (the same verdict)."""
    algorithm, name = config.sparse_algorithm, config.name
    if algorithm == "gtopk":
        results = backend.exchange(accs, ks, algorithm, f"{name}.0", digest, flags, config.wire)
        return results, backend.check_verdict(results[0].verdict, plan, ks, runtime_scale)
    results = []
    for i, (acc, k) in enumerate(zip(accs, ks)):
        if i > 0:
            acc = backend.after_verdict(finite, acc)
        results += backend.exchange([acc], [k], algorithm, f"{name}.{i}", digest, flags,
                                    config.wire)
        if i == 0:
            finite = backend.check_verdict(results[0].verdict, plan, ks, runtime_scale)
            if finite is False:
                break
    return results, finite
