"""Framework-free core of gtopk_hvd: imports NumPy only, never torch or tensorflow.

Holds the exchange schedule, k from density, density schedules, argument validation and the
NumPy reference of the whole algorithm (ALGORITHM.md), which every backend is tested against.
"""
from gtopk_hvd.common.density import (ConstantDensity, DensitySchedule, ExponentialWarmupDensity,
                                      StepwiseDensity, as_schedule, check_density, k_for)
from gtopk_hvd.common.errors import GTopkError, ProcessSetError
from gtopk_hvd.common.plan import PlanMismatchError
from gtopk_hvd.common.schedule import (Stage, exchange_groups, stages_for, virtual_rank,
                                       world_split)

__all__ = [
    "ConstantDensity", "DensitySchedule", "ExponentialWarmupDensity", "StepwiseDensity",
    "as_schedule", "check_density", "k_for",
    "GTopkError", "PlanMismatchError", "ProcessSetError",
    "Stage", "exchange_groups", "stages_for", "virtual_rank", "world_split",
]
