"""Bad input raises before any communication, single process, Horovod not even initialised.

Every check runs before the first collective (and before Horovod is needed at all), so these
tests show both the message and that nothing was sent.
"""
import logging
import math

import pytest
import torch

import gtopk_hvd.torch as hvd
from gtopk_hvd.common import GTopkError
from gtopk_hvd.torch.state import GTopkState


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _wrap(model, **kwargs):
    kwargs.setdefault("named_parameters", model.named_parameters())
    return hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


@pytest.mark.parametrize("density,text", [(0.0, "got 0.0"), (1.5, "got 1.5"), (-0.1, "got -0.1"),
                                          (math.nan, "got nan"), ("0.1", "'0.1'"),
                                          (True, "True")])
def test_optimizer_rejects_density_outside_0_1(model, density, text):
    with pytest.raises(ValueError, match="density") as info:
        _wrap(model, density=density)
    assert text in str(info.value) and "0.001" in str(info.value)


def test_optimizer_rejects_a_schedule_returning_a_bad_density(model):
    with pytest.raises(ValueError, match="density"):
        _wrap(model, density=lambda step: 2.0)


def test_optimizer_rejects_a_non_optimizer(model):
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got Sequential"):
        hvd.DistributedOptimizer(model)


def test_optimizer_rejects_wrapping_twice(model):
    fake = torch.optim.SGD(model.parameters(), lr=0.1)
    fake.gtopk_stats = lambda: {}
    with pytest.raises(ValueError, match="already a distributed optimizer"):
        hvd.DistributedOptimizer(fake)


def test_optimizer_rejects_duplicate_names(model):
    named = [("w", p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"duplicate names \['w'\]"):
        _wrap(model, named_parameters=named)


def test_optimizer_rejects_missing_names(model):
    named = list(model.named_parameters())[:2]
    with pytest.raises(ValueError, match="misses 2 of the optimizer's 4 parameters"):
        _wrap(model, named_parameters=named)


def test_optimizer_rejects_names_that_are_not_pairs(model):
    with pytest.raises(ValueError, match=r"\(name, parameter\) tuples"):
        _wrap(model, named_parameters=list(model.parameters()))


@pytest.mark.parametrize("op,name", [(hvd.Adasum, "Adasum"), (hvd.Min, "Min"),
                                     (hvd.Product, "Product")])
def test_optimizer_rejects_ops_other_than_average_and_sum(model, op, name):
    with pytest.raises(ValueError, match=f"op={name} is not supported.*hvd.Average"):
        _wrap(model, op=op)


def test_optimizer_rejects_a_non_global_process_set(model):
    with pytest.raises(ValueError, match="not supported yet.*global"):
        _wrap(model, process_set=hvd.ProcessSet([0]))


class _OtherCompressor(hvd.Compression.none):
    """A compressor of the user's own: gTop-k cannot know what it does to the values."""


@pytest.mark.parametrize("compression", [_OtherCompressor, "fp16"])
def test_optimizer_rejects_other_compression(model, compression):
    with pytest.raises(ValueError, match="Compression.none .* or hvd.Compression.fp16"):
        _wrap(model, compression=compression)


@pytest.mark.parametrize("kwargs,text", [
    ({"backward_passes_per_step": 0}, "backward_passes_per_step must be a positive integer"),
    ({"gradient_predivide_factor": 2.0, "op": hvd.Sum},
     "gradient_predivide_factor=2.0 is only supported with op=Average"),
    ({"gradient_predivide_factor": 0.0}, "gradient_predivide_factor must be a finite positive"),
    ({"gradient_predivide_factor": float("nan")}, "gradient_predivide_factor must be a finite"),
    ({"num_groups": 2}, "granularity"),
    ({"groups": 2}, "granularity"),
    ({"algorithm": "allreduce"}, "algorithm must be one of"),
    ({"granularity": "buckets"}, "granularity must be one of"),
    ({"dense_threshold": -1}, "dense_threshold must be a non-negative integer"),
])
def test_optimizer_rejects_other_bad_arguments(model, kwargs, text):
    with pytest.raises(ValueError, match=text):
        _wrap(model, **kwargs)


def test_new_arguments_are_keyword_only(model):
    args = [torch.optim.SGD(model.parameters(), lr=0.1), None, hvd.Compression.none, 1,
            hvd.Average, 1.0, 0, None, False, hvd.global_process_set, 0.01]
    with pytest.raises(TypeError):
        hvd.DistributedOptimizer(*args)


def test_optimizer_needs_horovod_initialised(model):
    if hvd.is_initialized():
        pytest.skip("Horovod was initialised in this process by another test")
    with pytest.raises(GTopkError, match="gtopk_hvd.torch.init()"):
        _wrap(model)


@pytest.mark.parametrize("kwargs,error,text", [
    ({"density": 0}, ValueError, "density must be in"),
    ({"op": hvd.Adasum}, ValueError, "op=Adasum"),
    ({"algorithm": "x"}, ValueError, "algorithm must be one of"),
    ({"process_set": hvd.ProcessSet([0, 1])}, ValueError, "not supported yet"),
    ({"residual": torch.zeros(3)}, ValueError, "residual must be a float32 tensor of 6"),
    ({"residual": torch.zeros(6, dtype=torch.float64)}, ValueError, "float64"),
])
def test_gtopk_allreduce_rejects_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        hvd.gtopk_allreduce(torch.ones(2, 3), **kwargs)


def test_gtopk_allreduce_rejects_integer_and_non_tensors():
    with pytest.raises(ValueError, match="floating-point"):
        hvd.gtopk_allreduce(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        hvd.gtopk_allreduce([1.0, 2.0])


def test_state_keeps_residuals_only_for_the_same_rank_and_world(caplog):
    state = GTopkState(0.01)
    state.step, state.residuals = 5, {"model": torch.arange(4.0)}
    saved = state.state_dict(size=4, rank=1)
    same = GTopkState(0.01)
    same.load_state_dict(saved, size=4, rank=1)
    assert same.step == 5 and torch.equal(same.residuals["model"], torch.arange(4.0))
    with caplog.at_level(logging.WARNING, logger="gtopk_hvd"):
        for size, rank in [(2, 1), (4, 0)]:
            other = GTopkState(0.01)
            other.load_state_dict(saved, size=size, rank=rank)
            assert other.step == 5 and other.residuals == {}
    assert sum("dropping the saved residuals" in r.getMessage() for r in caplog.records) == 2


def test_reshard_moves_a_residual_to_its_new_part_and_carries_the_rest_exactly():
    """An Elastic reset moved this rank's part of a buffer: the old part's entries inside
    the new one stay the residual, the others are carried to the next step's gradients, a
    whole-buffer (flat) part takes everything in; the entries are moved, never added up, so
    the mass is exactly what it was."""
    state = GTopkState(0.01)
    state.reshard({"model": (0, 5, 10)})  # the first step only records the place
    eps = torch.arange(1.0, 6.0)
    state.residuals["model"] = eps.clone()
    state.reshard({"model": (0, 5, 10)})  # unchanged: nothing moves
    assert torch.equal(state.residuals["model"], eps) and state.carry == {}
    state.reshard({"model": (3, 7, 10)})  # another shard (a new layout)
    assert torch.equal(state.residuals["model"], torch.tensor([4.0, 5.0, 0.0, 0.0]))
    assert torch.equal(state.carry["model"], torch.tensor([1.0, 2, 3, 0, 0, 0, 0, 0, 0, 0]))
    full = torch.cat([eps, torch.zeros(5)])
    assert state.residual_norm() == float(full.double().norm())
    state.reshard({"model": (0, 10, 10)})  # a flat layout: the whole buffer, carry included
    assert torch.equal(state.residuals["model"], full) and state.carry == {}
    state.reshard({"model": (0, 10, 12)})  # another buffer: residual() decides, nothing moves
    assert torch.equal(state.residuals["model"], full)
    state.reshard({"bias": (0, 2, 4)})  # a buffer without a residual: nothing to move
    assert "bias" not in state.residuals and state.carry == {}
    state.carry["model"] = torch.ones(10)
    saved = state.state_dict(size=2, rank=0)
    again = GTopkState(0.01)
    again.load_state_dict(saved, size=2, rank=0)
    assert torch.equal(again.carry["model"], torch.ones(10))


def test_state_keeps_residuals_only_for_the_same_layout(caplog):
    """Hierarchical gTop-k keeps a residual per shard, flat gTop-k per buffer: a checkpoint
    of another layout (or of a version that did not record it: read as flat) drops them."""
    hierarchical = ["hierarchical", 2, 2]
    state = GTopkState(0.01)
    state.step, state.residuals = 7, {"model": torch.arange(3.0)}
    saved = state.state_dict(size=4, rank=1, layout=hierarchical)
    same = GTopkState(0.01)
    same.load_state_dict(saved, size=4, rank=1, layout=hierarchical)
    assert torch.equal(same.residuals["model"], torch.arange(3.0))
    old_version = {k: v for k, v in state.state_dict(size=4, rank=1).items() if k != "layout"}
    with caplog.at_level(logging.WARNING, logger="gtopk_hvd"):
        for checkpoint, layout in [(saved, None), (saved, ["hierarchical", 4, 1]),
                                   (state.state_dict(size=4, rank=1), hierarchical),
                                   (old_version, hierarchical)]:
            other = GTopkState(0.01)
            other.load_state_dict(checkpoint, size=4, rank=1, layout=layout)
            assert other.step == 7 and other.residuals == {}
    said = [r.getMessage() for r in caplog.records
            if "other parts of the buffers" in r.getMessage()]
    assert len(said) == 4, said
    assert "hierarchical 2 x 2, now flat gTop-k" in said[0], said[0]
    flat = GTopkState(0.01)
    flat.load_state_dict(old_version, size=4, rank=1)
    assert torch.equal(flat.residuals["model"], torch.arange(3.0))


def test_state_rejects_something_else():
    with pytest.raises(ValueError, match="not a gtopk_hvd optimizer state"):
        GTopkState(0.01).load_state_dict({"residuals": {}}, size=1, rank=0)


def test_horovod_names_are_re_exported():
    import horovod.torch

    for name in ["rank", "size", "local_rank", "broadcast_parameters", "allreduce", "Average",
                 "Sum", "allgather", "broadcast_object", "global_process_set"]:
        assert getattr(hvd, name) is getattr(horovod.torch, name), name
    # Compression: Horovod's, plus gtopk
    assert issubclass(hvd.Compression, horovod.torch.Compression)
    assert hvd.Compression.none is horovod.torch.Compression.none
    assert hvd.Compression.fp16 is horovod.torch.Compression.fp16
    assert hvd.Compression.gtopk is hvd.GTopkCompressor
    assert hvd.DistributedOptimizer is not horovod.torch.DistributedOptimizer
    assert set(hvd.__all__) <= set(dir(hvd))
