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
