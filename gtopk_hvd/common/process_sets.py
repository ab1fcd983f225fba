"""The Horovod process sets the gTop-k schedule exchanges in (pairs, and for P not a power
of two groups of up to four with the extra ranks; gtopk_hvd.common.schedule).

Framework-free: the functions take the Horovod module (``horovod.torch`` or
``horovod.tensorflow``), whose process-set API is the same.  Registration is collective:
every rank adds every set of :func:`gtopk_hvd.common.schedule.exchange_groups`, in that
order.  A group that is the whole world maps onto Horovod's global process set (registering
it again is refused by Horovod).

The one rule for users: call ``gtopk_hvd.torch.init()`` (or ``gtopk_hvd.tensorflow.init()``)
on every rank instead of ``hvd.init()``.  It passes the groups to ``hvd.init`` as static
process sets when the launcher's environment tells the world size (horovodrun, mpirun), else
it initialises Horovod with dynamic process sets and registers them after.  With a plain
``hvd.init()``, the groups are registered the first time an optimizer is built, which works
when every rank builds its optimizers in the same order, and needs
HOROVOD_DYNAMIC_PROCESS_SETS=1.
"""
import logging
import os

from gtopk_hvd.common.errors import ProcessSetError
from gtopk_hvd.common.schedule import exchange_groups, stages_for

__all__ = ["init_with_exchange_sets", "exchange_sets", "prepare_exchange_sets",
           "process_set_for_stage", "first_stage_set", "world_size_before_init", "is_elastic",
           "hierarchical_sets", "job_layout", "hierarchical_job",
           "agree_on_mode"]

logger = logging.getLogger(__name__)

_DYNAMIC_ENV = "HOROVOD_DYNAMIC_PROCESS_SETS"
_cache = {}  # id(hvd module) -> (size, {group: ProcessSet})


def is_elastic():
    """Whether this process runs under Horovod Elastic (horovodrun sets HOROVOD_ELASTIC=1)."""
    return os.environ.get("HOROVOD_ELASTIC", "0") not in ("", "0")


def init_with_exchange_sets(hvd, comm=None, process_sets=None, hierarchical=False):
    """``hvd.init`` plus the exchange sets, registered statically when the world size is known.

    Static registration (``hvd.init(process_sets=[...])``) when the launcher tells the size
    before ``init`` (horovodrun / mpirun environment, or ``comm``) and neither
    ``process_sets="dynamic"`` nor HOROVOD_DYNAMIC_PROCESS_SETS=1 asks for dynamic sets: with
    dynamic sets Horovod's background thread runs one more allgather over all ranks in every
    cycle, which on a loaded host made each exchange 2-3x slower.  Otherwise Horovod
    starts with dynamic process sets and the groups are added after ``init``.

    ``hierarchical``: also the node and rail sets of hierarchical gTop-k
    (gtopk_hvd.common.hierarchy), registered after ``init`` (dynamic process sets), once
    Horovod knows whether every host has the same number of ranks; unequal hosts, one rank a
    host or one host fall back as :func:`job_layout` says (logged once).
    """
    _cache.pop(id(hvd), None)  # a new init: process set ids may differ
    _cache.pop((id(hvd), "hierarchical"), None)
    _cache.pop((id(hvd), "mode checked"), None)
    if hierarchical and not is_elastic():
        _cache[(id(hvd), "mode checked")] = set()
    wants_dynamic = (process_sets == "dynamic" or hierarchical
                     or os.environ.get(_DYNAMIC_ENV, "0") not in ("", "0"))
    size = None if wants_dynamic else world_size_before_init(comm)
    if size is None:
        if is_elastic():  # Horovod's elastic reset calls a plain hvd.init(): allow our sets
            os.environ[_DYNAMIC_ENV] = "1"
        if process_sets is None:
            process_sets = "dynamic"
        elif process_sets != "dynamic":
            os.environ[_DYNAMIC_ENV] = "1"  # keep the user's static sets and allow ours
        hvd.init(comm=comm, process_sets=process_sets)
        sets = prepare_exchange_sets(hvd)
        if hierarchical and not is_elastic():
            hierarchical_sets(hvd)
        return sets
    user = list(process_sets or [])
    taken = {tuple(sorted(ps.ranks)) for ps in user if ps.ranks is not None}
    ours = [hvd.ProcessSet(list(group)) for group in exchange_groups(size)
            if len(group) < size and group not in taken]
    hvd.init(comm=comm, process_sets=user + ours)
    if hvd.size() != size:
        raise ProcessSetError(
            f"gtopk_hvd predicted a world of {size} ranks from the launcher's environment "
            f"(or comm) but Horovod started {hvd.size()}; set {_DYNAMIC_ENV}=1 (or pass "
            f"process_sets='dynamic') so the exchange sets are registered after init")
    return exchange_sets(hvd)


_SIZE_ENV = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def world_size_before_init(comm=None):
    """The number of ranks ``hvd.init(comm)`` will start, or None if it cannot be known.

    ``comm``: a list of MPI ranks (Horovod then runs on those) or an mpi4py communicator.
    Else the launcher's environment: horovodrun sets HOROVOD_SIZE (Gloo), mpirun
    OMPI_COMM_WORLD_SIZE / PMI_SIZE.  Elastic jobs change size: None.
    """
    if comm is not None:
        if isinstance(comm, (list, tuple)):
            return len(comm)
        get_size = getattr(comm, "Get_size", None)
        return int(get_size()) if get_size is not None else None
    if os.environ.get("HOROVOD_ELASTIC", "0") not in ("", "0"):
        return None
    for var in _SIZE_ENV:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


def prepare_exchange_sets(hvd):
    """Register the exchange sets now (collective), except under Horovod Elastic, where a
    worker that joins runs this while the others synchronise their state: there they are
    registered at the first gTop-k exchange after each (re)start, where every rank is."""
    if is_elastic():
        return None
    return exchange_sets(hvd)


def _registered(hvd):
    """{ranks tuple: process set id} of the sets Horovod holds now.  Under Horovod Elastic,
    Horovod found shut down here (a peer died since the last step, before this step's first
    operation) is a lost worker: HorovodInternalError, so that ``elastic.run`` resets."""
    from horovod.common.exceptions import HorovodInternalError
    from horovod.common.process_sets import _basics
    try:
        ids = _basics._get_process_set_ids_and_ranks()
    except ValueError as err:  # "Horovod has not been initialized properly"
        if is_elastic():
            raise HorovodInternalError(err) from err
        raise
    return {tuple(ranks): ps_id for ps_id, ranks in ids.items()}


def exchange_sets(hvd):
    """Return {group: ProcessSet} for every group of the schedule, registering as needed."""
    if not hvd.is_initialized():
        raise ProcessSetError(
            "Horovod is not initialised: call gtopk_hvd.torch.init() (or "
            "gtopk_hvd.tensorflow.init()) on every rank before building a gTop-k optimizer")
    size = hvd.size()
    cached = _cache.get(id(hvd))
    if cached is not None and cached[0] == size and not (is_elastic() and _stale(hvd, cached)):
        return cached[1]
    sets = _register(hvd, exchange_groups(size), "two-rank process sets",
                     "call gtopk_hvd.torch.init() (or gtopk_hvd.tensorflow.init()) instead of "
                     "hvd.init() on every rank, or set " + _DYNAMIC_ENV + "=1 before hvd.init()")
    _cache[id(hvd)] = (size, sets)
    return sets


def _register(hvd, groups, what, fix):
    """{group: ProcessSet} for ``groups``: Horovod's global set for the whole world, the
    registered set where there is one, else registered now (collective: every rank, in the
    order of ``groups``; needs dynamic process sets, else ProcessSetError saying ``fix``)."""
    from horovod.common.process_sets import _temp_process_set_object
    existing, sets, missing = _registered(hvd), {}, []
    for group in groups:
        if len(group) == hvd.size():
            sets[group] = hvd.global_process_set
        elif group in existing:
            sets[group] = _temp_process_set_object(existing[group])
        else:
            missing.append(group)
    if missing and os.environ.get(_DYNAMIC_ENV, "0") in ("", "0"):
        raise ProcessSetError(
            f"gTop-k needs {len(missing)} {what} (for example {missing[0]}) that are not "
            f"registered, and Horovod was initialised without dynamic process sets. Fix: "
            f"{fix}")
    for group in missing:  # collective: every rank, same order
        sets[group] = hvd.add_process_set(list(group))
    if missing:
        logger.debug("gtopk_hvd: registered %d %s for size %d", len(missing), what,
                     hvd.size())
    return sets


def _stale(hvd, cached):
    """Whether Horovod was re-initialised (an elastic reset) since ``cached`` was built: its
    sets are gone or hold other ranks."""
    registered = _registered(hvd)
    return any(ps.process_set_id is not None and ps is not hvd.global_process_set
               and registered.get(group) != ps.process_set_id
               for group, ps in cached[1].items())


def process_set_for_stage(sets, stage):
    """The process set of ``stage`` (a schedule Stage)."""
    return sets[stage.group]


def first_stage_set(hvd):
    """The process set of this rank's first gTop-k stage (measure_link's probe of a stage)."""
    return process_set_for_stage(exchange_sets(hvd), stages_for(hvd.rank(), hvd.size())[0])


def job_layout(hvd):
    """The :class:`~gtopk_hvd.common.hierarchy.HierarchicalLayout` of this job, from
    Horovod's sizes (the same on every rank)."""
    from gtopk_hvd.common.hierarchy import hierarchical_layout
    from horovod.common.process_sets import _basics  # horovod.torch exports no is_homogeneous
    return hierarchical_layout(hvd.size(), hvd.local_size(), hvd.cross_size(),
                               bool(_basics.is_homogeneous()))


def hierarchical_sets(hvd):
    """(layout, {group: ProcessSet}) of hierarchical gTop-k, registering the node and rail sets
    as needed (collective: every rank, same order; needs dynamic process sets, which
    ``init(hierarchical=True)`` asks for).  A flat layout needs none of its own."""
    key = (id(hvd), "hierarchical")
    cached = _cache.get(key)
    layout = job_layout(hvd)
    if cached is not None and (cached[0].size, cached[0].local_size, cached[0].mode) == (
            layout.size, layout.local_size, layout.mode) and not (
            is_elastic() and _stale(hvd, cached)):
        return cached
    if layout.reason:
        logger.warning("gtopk_hvd: hierarchical=True on %d x %d ranks: %s", layout.nodes,
                       layout.local_size, layout.reason)
    sets = _register(hvd, layout.process_sets(), "node and rail process sets",
                     "call gtopk_hvd.torch.init(hierarchical=True) (or "
                     "gtopk_hvd.tensorflow.init(hierarchical=True)) on every rank instead of "
                     "hvd.init()")
    _cache[key] = (layout, sets)
    return layout, sets


def hierarchical_job(hvd):
    """Whether this job was started with ``init(hierarchical=True)`` (not under Elastic, which
    refuses hierarchical mode): then each gTop-k exchange's first run checks that every rank
    runs the same mode, hierarchical or flat, whose first operations run in different
    process sets (gtopk_hvd.common.plan.hierarchy_mismatch)."""
    return _cache.get((id(hvd), "mode checked")) is not None


def agree_on_mode(hvd, name, hierarchical, gather, once=True):
    """In a hierarchical job, refuse on every rank, before an exchange, ranks that run another
    mode (hierarchical or flat), whose first operations run in different process sets so
    their headers never meet: ``gather(mode, op_name)`` (the adapter's allgather over every
    rank, ``{name}.mode``) returns each rank's 1 or 0.  ``once``: only at the first exchange
    named ``name`` that found the ranks agreeing (``gtopk_allreduce``: every rank reaches its
    first call of a name alike); ``once=False`` checks now (an optimizer, until a step
    verified its set-up)."""
    from gtopk_hvd.common.plan import hierarchy_mismatch
    checked = _cache.get((id(hvd), "mode checked"))
    if checked is None or (once and name in checked):
        return
    error = hierarchy_mismatch(gather(int(bool(hierarchical)), f"{name}.mode"), hvd.rank())
    if error is not None:
        raise error
    if once:
        checked.add(name)
