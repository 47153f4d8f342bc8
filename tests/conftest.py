"""The project's own choices on top of its pytest plugin (:mod:`hvshare.perf.pytest_plugin`).

- Every test runs under the leak check (``no_leftovers``): no test may
  leave a process, a segment or a socket behind.
- ``hvs`` is the project's name for the plugin's ``hvshare`` fixture.
"""
from __future__ import annotations

import pytest

# The tests run against the installed package (``pip install -e '.[test]'``),
# whose entry point loads the plugin.


@pytest.fixture(autouse=True)
def no_leftovers(hvshare_leaks):
    """Fail the test if it leaves a process, a segment or a socket behind."""
    return None


@pytest.fixture
def hvs(hvshare):
    """A real hypervisor process on a private socket (8192 frames)."""
    return hvshare
