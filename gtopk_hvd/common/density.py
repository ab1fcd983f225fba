"""Density (the fraction of gradient entries kept), k from density, and density schedules.

``density`` is the one knob everywhere: a float in (0, 1] or a schedule.  A schedule maps the
optimizer's synchronisation step to a density.  Schedules used in practice (ALGORITHM.md):
the gTop-k code's stepwise warm-up (0.004 for the first epoch, 0.001 after) and DGC's
exponential warm-up (0.25, 0.0625, 0.015625, 0.004, 0.001 over the first epochs).
"""
import logging
import math
import numbers

__all__ = [
    "check_density",
    "k_for",
    "DensitySchedule",
    "ConstantDensity",
    "StepwiseDensity",
    "ExponentialWarmupDensity",
    "as_schedule",
]

logger = logging.getLogger(__name__)


def check_density(density, name="density"):
    """Return ``density`` as a float if it is a real number in (0, 1], else raise ValueError."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise ValueError(
            f"{name} must be a float in (0, 1] (for example 0.001), got {density!r} "
            f"of type {type(density).__name__}")
    value = float(density)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{name} must be in (0, 1], got {density!r}; use for example 0.001 to keep 0.1% "
            f"of the entries, or 1.0 for the dense result")
    return value


def k_for(numel, density):
    """Number of entries gTop-k keeps in a buffer of ``numel`` values: max(1, ceil(rho * d)).

    An empty buffer keeps nothing.  ``density`` is validated.
    """
    density = check_density(density)
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    numel = int(numel)
    if numel == 0:
        return 0
    # round() guards against 0.001 * 1000 = 1.0000000000000002 becoming 2.
    k = math.ceil(round(density * numel, 9))
    return min(numel, max(1, k))


class DensitySchedule:
    """Base class: ``schedule(step)`` is the density for synchronisation step ``step`` (0-based).

    ``steps_per_epoch`` converts steps into epochs for epoch-based schedules; with the
    default 1, steps and epochs are the same thing (useful for per-epoch callbacks).
    """

    def __init__(self, steps_per_epoch=1):
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral) \
                or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.steps_per_epoch = int(steps_per_epoch)

    def epoch_of(self, step):
        return int(step) // self.steps_per_epoch

    def density_at_epoch(self, epoch):
        raise NotImplementedError

    def __call__(self, step):
        return check_density(self.density_at_epoch(self.epoch_of(step)), name="scheduled density")


class ConstantDensity(DensitySchedule):
    """The same density at every step."""

    def __init__(self, density):
        super().__init__()
        self.density = check_density(density)

    def density_at_epoch(self, epoch):
        return self.density

    def __repr__(self):
        return f"ConstantDensity({self.density})"


class StepwiseDensity(DensitySchedule):
    """Piecewise-constant density: ``densities[i]`` during epoch i, the last one afterwards.

    The gTop-k paper's code: ``StepwiseDensity([0.004, 0.001], steps_per_epoch=N)``.
    """

    def __init__(self, densities, steps_per_epoch=1):
        super().__init__(steps_per_epoch)
        densities = list(densities)
        if not densities:
            raise ValueError("StepwiseDensity needs at least one density, got an empty list")
        self.densities = [check_density(d, name="densities[%d]" % i) for i, d in enumerate(densities)]

    def density_at_epoch(self, epoch):
        return self.densities[min(epoch, len(self.densities) - 1)]

    def __repr__(self):
        return f"StepwiseDensity({self.densities}, steps_per_epoch={self.steps_per_epoch})"


class ExponentialWarmupDensity(DensitySchedule):
    """DGC's warm-up: density decays exponentially from ``initial`` to ``final`` over
    ``warmup_epochs`` epochs, then stays at ``final``.

    With the defaults: 0.25, 0.0625, 0.015625, 0.0039, 0.001, 0.001, ...
    """

    def __init__(self, final=0.001, initial=0.25, warmup_epochs=4, steps_per_epoch=1):
        super().__init__(steps_per_epoch)
        self.final = check_density(final, name="final")
        self.initial = check_density(initial, name="initial")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, numbers.Integral) \
                or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        self.warmup_epochs = int(warmup_epochs)

    def density_at_epoch(self, epoch):
        if epoch >= self.warmup_epochs:
            return self.final
        return self.initial * (self.final / self.initial) ** (epoch / self.warmup_epochs)

    def __repr__(self):
        return (f"ExponentialWarmupDensity(final={self.final}, initial={self.initial}, "
                f"warmup_epochs={self.warmup_epochs}, steps_per_epoch={self.steps_per_epoch})")


class _CallableDensity(DensitySchedule):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __call__(self, step):
        return check_density(self.fn(step), name="density returned by %r" % (self.fn,))

    def __repr__(self):
        return f"density schedule {self.fn!r}"


def as_schedule(density):
    """Turn the ``density=`` argument (float, DensitySchedule or callable(step)) into a schedule.

    Raises ValueError at once for a bad float, so errors come before any communication.
    """
    if isinstance(density, DensitySchedule):
        return density
    if callable(density):
        schedule = _CallableDensity(density)
        schedule(0)  # validate the first value eagerly
        return schedule
    return ConstantDensity(density)
