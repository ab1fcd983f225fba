"""k from density, density validation and the density schedules (framework-free)."""
import math

import pytest

from gtopk_hvd.common import (ExponentialWarmupDensity, StepwiseDensity, as_schedule,
                              check_density, k_for)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, False,
                                 "0.01", None, [0.1]])
def test_check_density_rejects_and_names_the_value(bad):
    with pytest.raises(ValueError) as err:
        check_density(bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("good", [1e-9, 0.001, 0.5, 1, 1.0])
def test_check_density_accepts_the_open_closed_interval(good):
    assert check_density(good) == float(good)


@pytest.mark.parametrize("numel,density,k", [
    (1000, 0.001, 1), (1000, 0.01, 10), (1001, 0.01, 11), (10, 1e-6, 1), (10, 1.0, 10),
    (0, 0.5, 0), (25_000_000, 0.001, 25_000), (3, 0.5, 2),
])
def test_k_for_is_max_one_ceil_rho_d(numel, density, k):
    assert k_for(numel, density) == k
    if numel:
        assert k == min(numel, max(1, math.ceil(density * numel - 1e-9)))


def test_k_for_rejects_bad_numel():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            k_for(bad, 0.1)


def test_stepwise_schedule_is_the_papers_warmup():
    s = StepwiseDensity([0.004, 0.001], steps_per_epoch=10)
    assert [s(i) for i in (0, 9, 10, 11, 1000)] == [0.004, 0.004, 0.001, 0.001, 0.001]


def test_exponential_warmup_is_dgcs_sequence():
    s = ExponentialWarmupDensity(final=0.001, initial=0.25, warmup_epochs=4, steps_per_epoch=3)
    got = [s(3 * e) for e in range(6)]
    want = [0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001]
    assert got == pytest.approx(want, rel=0.02)
    assert s(3 * 1 + 2) == s(3 * 1)  # constant inside an epoch


def test_as_schedule_accepts_float_schedule_and_callable():
    assert as_schedule(0.01)(123) == 0.01
    sched = StepwiseDensity([0.5, 0.1])
    assert as_schedule(sched) is sched
    assert as_schedule(lambda step: 0.1 if step < 2 else 0.01)(5) == 0.01


def test_as_schedule_validates_eagerly_and_callable_values_lazily():
    with pytest.raises(ValueError, match="1.5"):
        as_schedule(1.5)
    with pytest.raises(ValueError, match="got 0"):
        as_schedule(lambda step: 0)
    sched = as_schedule(lambda step: 0.1 if step < 2 else 7.0)
    with pytest.raises(ValueError, match="7.0"):
        sched(3)
    with pytest.raises(ValueError):
        StepwiseDensity([])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        StepwiseDensity([0.1], steps_per_epoch=0)
