"""Suite-wide pytest hooks.

``GTOPK_TEST_CPU=<file>``: append, per test, its wall seconds and the CPU seconds that it and
the processes it waited for (horovodrun jobs, ``python -c`` runs) used, to find where the
suite's time goes (docs/testing.md).  Off by default.
"""
import os
import resource
import time

import pytest

_CPU_FILE = os.environ.get("GTOPK_TEST_CPU")


def _cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _CPU_FILE:
        yield
        return
    wall, (own, kids) = time.perf_counter(), _cpu()
    yield
    own2, kids2 = _cpu()
    with open(_CPU_FILE, "a") as f:
        f.write(f"{time.perf_counter() - wall:8.2f} {own2 - own:8.2f} {kids2 - kids:8.2f} "
                f"{item.nodeid}\n")
