import pytest

from hvshare.hvcore import Hypervisor
from hvshare.hvcore.constants import RMAP_POLICIES as POLICIES


@pytest.fixture(params=POLICIES)
def hv(request):
    """A small in-process core on each rmap policy; closed after the test."""
    h = Hypervisor(256, rmap=request.param)
    yield h
    assert h.audit_report() == []
    h.close()
