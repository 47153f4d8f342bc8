"""The project's own choices on top of its pytest plugin (:mod:`perf.pytest_plugin`).

- Every test runs under the leak check (``no_leftovers``): no test may
  leave a process, a segment or a socket behind.
- ``hvs`` is the project's name for the plugin's ``hvshare`` fixture.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import perf  # noqa: F401
except ImportError:  # run as plain `pytest` without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A checkout run without installing hvshare (or installed before the plugin
# existed) has no entry point to load the plugin by.
if not any(ep.name == "hvshare" for ep in metadata.entry_points(group="pytest11")):
    pytest_plugins = ["perf.pytest_plugin"]


@pytest.fixture(autouse=True)
def no_leftovers(hvshare_leaks):
    """Fail the test if it leaves a process, a segment or a socket behind."""
    return None


@pytest.fixture
def hvs(hvshare):
    """A real hypervisor process on a private socket (8192 frames)."""
    return hvshare
