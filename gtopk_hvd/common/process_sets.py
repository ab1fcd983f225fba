"""The two-rank Horovod process sets the gTop-k schedule exchanges in.

Framework-free: the functions take the Horovod module (``horovod.torch`` or
``horovod.tensorflow``), whose process-set API is the same.  Registration is collective:
every rank adds every pair set of :func:`gtopk_hvd.common.schedule.pair_groups`, in that order.
A pair that is the whole world maps onto Horovod's global process set (registering it again is
refused by Horovod).

The one rule for users: call ``gtopk_hvd.torch.init()`` (or ``gtopk_hvd.tensorflow.init()``)
on every rank instead of ``hvd.init()``.  It initialises Horovod with dynamic process sets and
registers the pairs.  With a plain ``hvd.init()``, the pairs are registered the first time an
optimizer is built, which works when every rank builds its optimizers in the same order, and
needs HOROVOD_DYNAMIC_PROCESS_SETS=1.
"""
import logging
import os

from gtopk_hvd.common.errors import ProcessSetError
from gtopk_hvd.common.schedule import pair_groups

__all__ = ["init_with_pair_sets", "pair_sets", "process_set_for_stage"]

logger = logging.getLogger(__name__)

_DYNAMIC_ENV = "HOROVOD_DYNAMIC_PROCESS_SETS"
_cache = {}  # id(hvd module) -> (size, {pair: ProcessSet})


def init_with_pair_sets(hvd, comm=None, process_sets=None):
    """``hvd.init`` with dynamic process sets enabled, then register the pair sets."""
    if process_sets is None:
        process_sets = "dynamic"
    else:
        os.environ[_DYNAMIC_ENV] = "1"  # keep the user's static sets and allow ours
    hvd.init(comm=comm, process_sets=process_sets)
    return pair_sets(hvd)


def pair_sets(hvd):
    """Return {(low, high): ProcessSet} for every pair of the schedule, registering as needed."""
    if not hvd.is_initialized():
        raise ProcessSetError(
            "Horovod is not initialised: call gtopk_hvd.torch.init() (or "
            "gtopk_hvd.tensorflow.init()) on every rank before building a gTop-k optimizer")
    size = hvd.size()
    cached = _cache.get(id(hvd))
    if cached is not None and cached[0] == size:
        return cached[1]
    from horovod.common.process_sets import _basics, _temp_process_set_object

    existing = {tuple(ranks): ps_id for ps_id, ranks in _basics._get_process_set_ids_and_ranks().items()}
    sets = {}
    missing = []
    for group in pair_groups(size):
        if len(group) == size:
            sets[group] = hvd.global_process_set
        elif group in existing:
            sets[group] = _temp_process_set_object(existing[group])
        else:
            missing.append(group)
    if missing and os.environ.get(_DYNAMIC_ENV, "0") in ("", "0"):
        raise ProcessSetError(
            f"gTop-k needs {len(missing)} two-rank process sets (for example {missing[0]}) that "
            f"are not registered, and Horovod was initialised without dynamic process sets. "
            f"Fix: call gtopk_hvd.torch.init() (or gtopk_hvd.tensorflow.init()) instead of "
            f"hvd.init() on every rank, or set {_DYNAMIC_ENV}=1 before hvd.init()")
    for group in missing:  # collective: every rank, same order
        sets[group] = hvd.add_process_set(list(group))
    if missing:
        logger.debug("gtopk_hvd: registered %d pair process sets for size %d", len(missing), size)
    _cache[id(hvd)] = (size, sets)
    return sets


def process_set_for_stage(sets, rank, stage):
    """The process set of ``stage`` (a schedule Stage) on ``rank``."""
    return sets[(min(rank, stage.partner), max(rank, stage.partner))]
