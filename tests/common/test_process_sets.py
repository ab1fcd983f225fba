"""world_size_before_init: the size gtopk_hvd's init registers static pair sets for."""
import pytest

from gtopk_hvd.common.process_sets import world_size_before_init

SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "HOROVOD_ELASTIC")


@pytest.fixture
def clean_env(monkeypatch):
    for var in SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_unknown_without_launcher(clean_env):
    assert world_size_before_init() is None


@pytest.mark.parametrize("var", ["HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_launcher_environment(clean_env, var):
    clean_env.setenv(var, "6")
    assert world_size_before_init() == 6


def test_horovodrun_variable_wins(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "8")
    clean_env.setenv("HOROVOD_SIZE", "3")
    assert world_size_before_init() == 3


@pytest.mark.parametrize("bad", ["", "0", "four", "-2"])
def test_unusable_values_are_ignored(clean_env, bad):
    clean_env.setenv("HOROVOD_SIZE", bad)
    assert world_size_before_init() is None


def test_elastic_jobs_change_size(clean_env):
    clean_env.setenv("HOROVOD_SIZE", "4")
    clean_env.setenv("HOROVOD_ELASTIC", "1")
    assert world_size_before_init() is None


def test_comm_list_and_communicator(clean_env):
    clean_env.setenv("HOROVOD_SIZE", "8")
    assert world_size_before_init([0, 2, 5]) == 3

    class Comm:
        def Get_size(self):  # noqa: N802 (mpi4py's name)
            return 5
    assert world_size_before_init(Comm()) == 5
    assert world_size_before_init(object()) is None


def test_a_named_horovod_operation_lost_to_a_dead_worker_counts_as_lost():
    """Horovod's TensorFlow elastic wrapper recognises a lost worker by the operation's type
    in the error (HorovodAllgather ...), which only an unnamed operation's node carries; a
    named one, as gtopk_hvd's exchanges are, fails with Horovod's shutdown message alone.
    That worker died instead of resetting, now and then in the Keras Elastic test."""
    from gtopk_hvd.common.errors import lost_worker
    named = ("Horovod has been shut down. This was caused by an exception on one of the ranks "
             "or an attempt to allreduce, allgather or broadcast a tensor after one of the "
             "ranks finished execution.\n\t [[{{node DistributedSGD.0.s0}}]] "
             "[Op:__inference_train_function_3367]")
    assert lost_worker(named)
    assert lost_worker("... [[{{node HorovodAllreduce_grads_0}}]]")
    assert not lost_worker("Incompatible shapes: [3] vs. [4]")
    assert not lost_worker(None)


def test_horovod_found_shut_down_under_elastic_is_a_lost_worker(clean_env):
    """A peer that died between two steps shuts Horovod down; the next step's look at the
    registered process sets (hierarchical gTop-k under Elastic) then meets Horovod's "not
    initialized" ValueError, which must reach ``elastic.run`` as HorovodInternalError (a
    reset), not kill the survivor; outside Elastic it stays the ValueError."""
    import horovod.common.process_sets as horovod_sets
    from horovod.common.exceptions import HorovodInternalError

    from gtopk_hvd.common.process_sets import _registered

    class ShutDown:
        def _get_process_set_ids_and_ranks(self):
            raise ValueError("Horovod has not been initialized properly; use hvd.init().")
    clean_env.setattr(horovod_sets, "_basics", ShutDown())
    clean_env.setenv("HOROVOD_ELASTIC", "1")
    with pytest.raises(HorovodInternalError):
        _registered(None)
    clean_env.setenv("HOROVOD_ELASTIC", "0")
    with pytest.raises(ValueError):
        _registered(None)
