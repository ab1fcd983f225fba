"""Horovod's own optimizer tests, re-written for gTop-k at density 1.

Horovod v0.28.1's ``test/parallel/test_torch.py`` checks ``DistributedOptimizer`` through the
behaviours below (each scenario names the test it follows; docs/compatibility.md has the
table).  Here every behaviour runs three ways in one process:

- ``horovod``: Horovod's own ``DistributedOptimizer`` (the oracle);
- ``drop_in``: ``gtopk_hvd.torch.DistributedOptimizer(..., density=1.0)``;
- ``compressor``: Horovod's optimizer with ``compression=Compression.gtopk(density=1.0)``.

A hook on every parameter rounds its gradient to a multiple of 1/16 and clips it to
[-1024, 1024] before it reaches the optimizer, so every sum over ranks is exact whatever its
order: gTop-k's merge tree and Horovod's ring must then give the same parameters and
optimizer state bit for bit.  The op is Horovod's default, Average, where P is a power of
two, and Sum elsewhere: gTop-k averages by dividing by P (the correctly rounded quotient,
ALGORITHM.md's scatter(S) / P), Horovod by multiplying with float32(1 / P), which can differ
in the last bit when P is not a power of two (docs/compatibility.md; optimizer_worker.py's
density_one checks gTop-k's quotient).  Scenarios communicate first and assert afterwards, so
a failing rank never leaves the others in a collective.  Run by torch_worker.py at P = 2
and 3 (tests/jobs.py PARITY_IN_TORCH_JOB).
"""
import inspect
import itertools
import warnings

import horovod.torch as horovod_hvd
import torch
import torch.nn.functional as F
from _common import assert_equal
from torch import nn

from gtopk_hvd.torch import Compression
from tests.parity_cases import CLIP, GRID, MODES, averages
from tests.parity_cases import agree_with_horovod as agree

#: the keyword sets Horovod's tests give every optimizer (each takes what its signature has)
OPTION_SETS = (dict(lr=0.2, momentum=0.9, weight_decay=0.1, centered=True), dict(lr=0.2))


def optimizer_classes():
    """Horovod's list: ``torch.optim``'s direct subclasses of Optimizer, sorted by name, without
    LBFGS (a closure: drop-in only, tested in optimizer_worker.py), SparseAdam (sparse
    gradients) and Muon (newer than Horovod's tests; it takes only matrices, no biases)."""
    return sorted((c for c in torch.optim.Optimizer.__subclasses__()
                   if c.__module__.startswith("torch.optim")
                   and c.__name__ not in ("LBFGS", "SparseAdam", "Muon")),
                  key=lambda c: c.__name__)


def wrap(hvd, mode, optimizer, **kwargs):
    """``optimizer`` made distributed the way ``mode`` says (density 1 for gTop-k)."""
    kwargs.setdefault("op", hvd.Average if averages(hvd.size()) else hvd.Sum)
    if mode == "horovod":
        return horovod_hvd.DistributedOptimizer(optimizer, **kwargs)
    if mode == "drop_in":
        return hvd.DistributedOptimizer(optimizer, density=1.0, **kwargs)
    return horovod_hvd.DistributedOptimizer(
        optimizer, compression=Compression.gtopk(density=1.0), **kwargs)


def exact_gradients(module):
    """Round every gradient of ``module`` to a multiple of 1/16 in [-1024, 1024]: sums over
    up to 1024 ranks are exact in float32 in any order."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: torch.round(g.clamp(-CLIP, CLIP) * GRID) / GRID)
    return module


def new_optimizer(cls, options, params):
    """Horovod's helper: ``cls`` with the options its signature accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls(params, **{k: v for k, v in options.items() if k in accepted})


def mlp(seed, d_in=20, hidden=10, d_out=10):
    torch.manual_seed(seed)
    return exact_gradients(nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(),
                                         nn.Linear(hidden, d_out)))


def batch(seed, n=16, d_in=20, d_out=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, (n, d_in), generator=g).float(),
            torch.randint(-4, 5, (n, d_out), generator=g).float())


def values(optimizer):
    """Horovod's ``get_optimizer_param_values``: every state entry, in order."""
    state_dict = optimizer.state_dict()
    out = []
    for group in state_dict["param_groups"]:
        for pid in group["params"]:
            for k, v in sorted(state_dict["state"].get(pid, {}).items()):
                out.append((k, v.clone() if torch.is_tensor(v) else v))
    return out


def params_of(model):
    return [(k, v.clone()) for k, v in sorted(model.state_dict().items())]


def same(a, b, what):
    """Two lists of (name, value) equal bit for bit, names and types included."""
    assert [n for n, _ in a] == [n for n, _ in b], (what, [n for n, _ in a], [n for n, _ in b])
    for (name, x), (_, y) in zip(a, b):
        assert type(x) is type(y), f"{what}, {name}: {type(x)} != {type(y)}"
        if torch.is_tensor(x):
            assert_equal(x, y.numpy(), f"{what}, {name}")
        else:
            assert x == y, f"{what}, {name}: {x!r} != {y!r}"


def agree_with_horovod(results, what):
    """Every mode's result (lists of (name, value) lists) equals the oracle's, bit for bit."""
    agree(results, what, same)


def broadcast_state(hvd, rec, rank, size):
    """test_broadcast_state: a step, rank 0 saves, every rank rebuilds, rank 0 loads,
    broadcast_parameters + broadcast_optimizer_state: every rank holds rank 0's model and
    state; and the step itself agrees with Horovod's (whose own broadcast is not re-tested)."""
    steps = {}
    for mode in MODES:
        with rec(f"horovod_test_broadcast_state_{mode}") as data:
            runs = []
            for i, cls in enumerate(optimizer_classes()):  # Horovod: both OPTION_SETS
                options = OPTION_SETS[0]  # momentum, weight decay, centered: the most state
                seed = 9000 + 10 * i
                model = mlp(seed + rank)
                opt = wrap(hvd, mode, new_optimizer(cls, options, model.parameters()),
                           named_parameters=model.named_parameters())
                x, y = batch(seed + 100 + rank)
                opt.zero_grad()
                F.mse_loss(model(x), y, reduction="sum").backward()
                opt.step()
                runs.append((cls.__name__, params_of(model)))
                if mode == "horovod":
                    continue
                saved = ({"model": model.state_dict(), "optimizer": opt.state_dict()}
                         if rank == 0 else None)
                want = hvd.broadcast_object(  # what rank 0 holds, in one collective
                    (params_of(model), values(opt), len(opt.state_dict()["state"]))
                    if rank == 0 else None, root_rank=0, name=f"bs.{mode}.{i}")
                model = mlp(seed + 50 + rank)
                opt = wrap(hvd, mode, new_optimizer(cls, options, model.parameters()),
                           named_parameters=model.named_parameters())
                if rank == 0:
                    model.load_state_dict(saved["model"])
                    opt.load_state_dict(saved["optimizer"])
                hvd.broadcast_parameters(model.state_dict(), root_rank=0)
                got_params = params_of(model)  # before the state: Horovod's state broadcast
                # steps with zero gradients where the state is empty (weight decay moves them)
                hvd.broadcast_optimizer_state(opt, root_rank=0)
                runs[-1] += (want, (got_params, values(opt), len(opt.state_dict()["state"])))
            data["optimizers"] = sorted({r[0] for r in runs})
            for name, _, *broadcast in runs:
                if broadcast:
                    (want_params, want_state, n0), (got_params, got_state, n) = broadcast
                    same(got_params, want_params, f"{name}: parameters after the broadcast")
                    same(got_state, want_state, f"{name}: optimizer state after the broadcast")
                    assert n == n0, f"{name}: {n} state entries, rank 0 has {n0}"
            steps[mode] = [r[1] for r in runs]
    with rec("horovod_test_broadcast_state_steps_agree_with_horovod"):
        agree_with_horovod(steps, "the step")


def broadcast_state_options(hvd, rec, rank, size):
    """test_broadcast_state_options: ranks build their optimizers with different options;
    after broadcast_optimizer_state every rank has rank 0's, of the same types; a second
    step then works and agrees with Horovod's."""
    options = [dict(lr=0.125, momentum=0.75, weight_decay=0.25, nesterov=True,
                    betas=(0.875, 0.996), etas=(0.75, 2.5), step_sizes=(1e-5, 100)),
               dict(lr=0.25, momentum=0.875, weight_decay=0.125, nesterov=False,
                    betas=(0.75, 0.875), etas=(0.25, 1.75), step_sizes=(1e-7, 5))]
    results = {}
    for mode in MODES:
        with rec(f"horovod_test_broadcast_state_options_{mode}"):
            runs = []
            for i, cls in enumerate(optimizer_classes()):
                model = mlp(9500 + i)
                opt = wrap(hvd, mode, new_optimizer(cls, options[min(rank, 1)],
                                                    model.parameters()),
                           named_parameters=model.named_parameters())
                x, y = batch(9600 + i + rank)
                opt.zero_grad()
                F.mse_loss(model(x), y, reduction="sum").backward()
                opt.step()
                hvd.broadcast_optimizer_state(opt, root_rank=0)
                group = dict(opt.param_groups[0])
                opt.zero_grad()  # the options' types must still work in a step
                F.mse_loss(model(x), y, reduction="sum").backward()
                opt.step()
                runs.append((cls.__name__, group, params_of(model)))
            for name, group, _ in runs:
                accepted = inspect.signature(getattr(torch.optim, name).__init__).parameters
                for k, want in options[0].items():
                    if k in accepted:
                        got = group[k]
                        assert type(got) is type(want) and got == want, (name, k, got, want)
            results[mode] = [r[2] for r in runs]
    with rec("horovod_test_broadcast_state_options_second_step_agrees_with_horovod"):
        agree_with_horovod(results, "after the broadcast and a second step")


class ModelNoGrad(nn.Module):
    """Horovod's test_broadcast_state_no_grad model: an integer parameter without gradient."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(a.int(), requires_grad=False)
        self.b = nn.Parameter(b)

    def forward(self, x):
        return torch.index_select(self.b, 0, self.a.long()) * x


def broadcast_state_no_grad(hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"horovod_test_broadcast_state_no_grad_{mode}"):
            torch.manual_seed(9700 + rank)
            model = ModelNoGrad(torch.tensor([1.0, 3.0]), torch.rand(4))
            opt = wrap(hvd, mode, torch.optim.SGD(model.parameters(), lr=0.001,
                                                  weight_decay=1e-6, momentum=0.9,
                                                  nesterov=True),
                       named_parameters=model.named_parameters())
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            hvd.broadcast_optimizer_state(opt, root_rank=0)
            grad = opt.param_groups[0]["params"][1].grad
            from_root = hvd.broadcast(grad, root_rank=0, name=f"nograd.{mode}")
            b_root = hvd.broadcast(model.b.detach(), root_rank=0, name=f"nograd.b.{mode}")
            assert opt.param_groups[0]["params"][0].grad is None
            assert torch.equal(grad, from_root), (grad, from_root)
            assert torch.equal(model.b.detach(), b_root)
            assert model.a.dtype == torch.int32 and model.a.tolist() == [1, 3]


class TwoHeads(nn.Module):
    """Horovod's test_force_allreduce model: rank 0's loss uses one head, the others the
    other, so some parameters have no gradient on some ranks."""

    def __init__(self, d_in=20, hidden=10, d_out=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        self.fc3 = nn.Linear(d_out, d_out)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x1 = self.fc2(x)
        return x1, self.fc3(F.relu(x1))


def force_allreduce(hvd, rec, rank, size):
    results = {}
    for mode in MODES:
        with rec(f"horovod_test_force_allreduce_{mode}"):
            runs = []
            for i, (cls, options) in enumerate(itertools.product(optimizer_classes(),
                                                                 OPTION_SETS)):
                torch.manual_seed(9800 + i)  # the same model on every rank
                model = exact_gradients(TwoHeads())
                opt = wrap(hvd, mode, new_optimizer(cls, options, model.parameters()),
                           named_parameters=model.named_parameters())
                x, y = batch(9900 + i + rank)
                out1, out2 = model(x)
                loss = F.mse_loss(out1 if rank == 0 else out2, y, reduction="sum")
                opt.zero_grad()
                loss.backward()
                opt.step()
                runs.append(params_of(model))
            results[mode] = runs
    with rec("horovod_test_force_allreduce_agrees_with_horovod"):
        agree_with_horovod(results, "parameters without a gradient on some ranks")


def dynamic_requires_grad(hvd, rec, rank, size):
    """test_dynamic_requires_grad: a generator and a discriminator, each with its own
    distributed optimizer, trained in turns by toggling ``requires_grad``."""
    results = {}
    for mode in MODES:
        with rec(f"horovod_test_dynamic_requires_grad_{mode}"):
            torch.manual_seed(10000)
            gen, disc = exact_gradients(nn.Conv2d(1, 10, 1)), exact_gradients(nn.Conv2d(10, 1, 1))
            inp = torch.randint(0, 3, (1, 1, 8, 8), generator=torch.Generator().manual_seed(
                10001 + rank)).float()
            gen_opt = wrap(hvd, mode, torch.optim.SGD(gen.parameters(), lr=0.125),
                           named_parameters=gen.named_parameters())
            disc_opt = wrap(hvd, mode, torch.optim.SGD(disc.parameters(), lr=0.125),
                            named_parameters=disc.named_parameters())
            history, seen = [], []
            for _ in range(3):
                for train_gen in (True, False):
                    for p in gen.parameters():
                        p.requires_grad_(train_gen)
                    for p in disc.parameters():
                        p.requires_grad_(not train_gen)
                    gen_opt.zero_grad()
                    disc_opt.zero_grad()
                    disc(gen(inp)).sum().backward()
                    seen.append([(p.grad is not None and bool(p.grad.abs().max() > 0))
                                 for p in (*gen.parameters(), *disc.parameters())])
                    (gen_opt if train_gen else disc_opt).step()
                    history.append(params_of(gen) + params_of(disc))
            for t, flags in enumerate(seen):
                train_gen = t % 2 == 0
                assert flags == [train_gen] * 2 + [not train_gen] * 2, (t, flags)
            results[mode] = history
    with rec("horovod_test_dynamic_requires_grad_agrees_with_horovod"):
        agree_with_horovod(results, "generator and discriminator in turns")


def gradient_clipping(hvd, rec, rank, size):
    """test_gradient_clipping and test_synchronize_step_warning: synchronize(), clip, then
    step() inside skip_synchronize(); step() without it warns with Horovod's words."""
    results = {}
    for mode in MODES:
        with rec(f"horovod_test_gradient_clipping_{mode}"):
            model = exact_gradients(nn.Linear(1, 1))
            model.weight = nn.Parameter(torch.zeros(1, 1) + 0.5)
            model.bias = nn.Parameter(torch.zeros(1))
            exact_gradients(model)
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            opt = wrap(hvd, mode, torch.optim.SGD(model.parameters(), lr=0.1),
                       named_parameters=model.named_parameters())
            x = torch.ones(1, 1) * (rank + 1)
            opt.zero_grad()
            F.mse_loss(model(x), torch.ones(1, 1)).backward()
            opt.synchronize()
            prior = model.weight.grad.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            clipped = model.weight.grad.item()
            with opt.skip_synchronize():
                opt.step()
            after_clip = params_of(model)
            opt.zero_grad()
            F.mse_loss(model(x), torch.ones(1, 1)).backward()
            opt.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            assert abs(prior) > abs(clipped), (prior, clipped)
            texts = [str(w.message) for w in caught]
            assert len(texts) == 1, texts
            assert "optimizer.step() called without optimizer.skip_synchronize()" in texts[0], \
                texts
            # Horovod's step() after synchronize() reduces the reduced gradients once more (so
            # does the Compressor inside it): the same values only for an average over a power
            # of two; the drop-in steps with the gradients synchronize() gave
            results[mode] = [after_clip] + ([params_of(model)] if averages(size) else [])
    with rec("horovod_test_gradient_clipping_agrees_with_horovod"):
        agree_with_horovod(results, "clipped, then a step after synchronize()")


def no_named_parameters(hvd, rec, rank, size):
    """test_no_named_parameters and test_optimizer_no_named_parameters: without
    ``named_parameters`` (one group or several) the optimizer names the parameters itself,
    the same on every rank, and trains as Horovod's does."""
    results = {}
    for mode in MODES:
        with rec(f"horovod_test_no_named_parameters_{mode}"):
            inp = torch.randint(-2, 3, (1, 1, 6, 6), generator=torch.Generator().manual_seed(
                10101 + rank)).float()
            runs = []
            for several in (False, True):
                torch.manual_seed(10100)
                model = exact_gradients(nn.Sequential(nn.Conv2d(1, 6, 1), nn.Conv2d(6, 1, 1)))
                groups = ([{"params": model[0].parameters()},
                           {"params": model[1].parameters(), "lr": 0.0625}] if several
                          else model.parameters())
                opt = wrap(hvd, mode, torch.optim.SGD(groups, lr=0.125))
                opt.zero_grad()
                model(inp).sum().backward()
                opt.step()
                runs.append(params_of(model))
            results[mode] = runs
    with rec("horovod_test_no_named_parameters_agrees_with_horovod"):
        agree_with_horovod(results, "no named_parameters")


def named_parameter_errors(hvd, rec, rank, size):
    """test_duplicate_names and test_missing_named_parameters: ValueError at construction,
    before any communication (the Compressor is Horovod's own optimizer: Horovod's check)."""
    for mode in MODES:
        with rec(f"horovod_test_duplicate_and_missing_names_{mode}"):
            net1, net2 = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
            cases = {
                "duplicate": (itertools.chain(net1.parameters(), net2.parameters()),
                              itertools.chain(net1.named_parameters(),
                                              net2.named_parameters())),
                "missing": (net1.parameters(), list(net1.named_parameters())[:1])}
            for case, (params, named) in cases.items():
                try:
                    wrap(hvd, mode, torch.optim.SGD(params, lr=0.1), named_parameters=named)
                except ValueError:
                    continue
                raise AssertionError(f"{case} names: no ValueError")


def sparse_embeddings(hvd, rec, rank, size):
    """test_sparse_embeddings: SparseAdam on ``nn.Embedding(sparse=True)``.  With
    ``sparse_as_dense=True`` every mode trains the same; without it, Horovod's optimizer (and
    so the Compressor, which never sees sparse gradients) allgathers them, and the drop-in
    refuses before communicating (its exchange is dense-in, sparse-on-the-wire)."""
    results, refusals = {}, {}
    inp = (torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]]) if rank == 0
           else torch.tensor([[1, 3, 4], [4, 7, 9]]))
    for mode in MODES:
        with rec(f"horovod_test_sparse_embeddings_{mode}"):
            runs = []
            for sparse_as_dense in (True, False):
                torch.manual_seed(10200)
                model = nn.Embedding(10, 3, sparse=True)  # gradients: counts, exact
                opt = torch.optim.SparseAdam(list(model.parameters()), lr=0.125)
                try:
                    opt = wrap(hvd, mode, opt, sparse_as_dense=sparse_as_dense,
                               named_parameters=model.named_parameters())
                    opt.zero_grad()
                    model(inp).sum().backward()
                    opt.step()
                except ValueError as err:
                    refusals[(mode, sparse_as_dense)] = str(err)
                    continue
                runs.append(params_of(model))
            results[mode] = runs
            assert ((mode, False) in refusals) == (mode == "drop_in"), refusals
            if mode == "drop_in":
                assert "sparse_as_dense=True" in refusals[(mode, False)], refusals
            assert (mode, True) not in refusals, refusals
    with rec("horovod_test_sparse_embeddings_agree_with_horovod"):
        # the drop-in ran only with sparse_as_dense=True (the first run of every mode)
        first = {mode: runs[:1] for mode, runs in results.items()}
        agree_with_horovod(first, "sparse embeddings, sparse_as_dense=True")
        assert len(results["compressor"]) == 2
        same(results["compressor"][1], results["horovod"][1],
             "sparse embeddings, sparse_as_dense=False: the Compressor vs Horovod's optimizer")


SCENARIOS = (broadcast_state, broadcast_state_options, broadcast_state_no_grad, force_allreduce,
             dynamic_requires_grad, gradient_clipping, no_named_parameters,
             named_parameter_errors, sparse_embeddings)
