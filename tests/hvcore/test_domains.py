"""Creating domains: every error leaves nothing behind, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest

from hvshare.hvcore import HVError
from hvshare.hvcore.errors import (EINVAL, ENOMEM)


def pages(*values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None], 4096, axis=1)


def code(excinfo) -> int:
    return excinfo.value.code


def test_create_domain_errors_leave_nothing(hv):
    free = hv.pool.nfree
    with pytest.raises(HVError) as e:
        hv.create_domain(free + 1)
    assert code(e) == ENOMEM
    with pytest.raises(HVError) as e:
        hv.create_domain(4, content=np.zeros((3, 4096), np.uint8))
    assert code(e) == EINVAL
    assert hv.pool.nfree == free and not hv.domains


# -- creation in bounded chunks (DomainBuild) ---------------------------------

def test_chunked_create_gives_the_bytes_of_a_one_call_create(hv):
    """A create worked off in many small steps populates every gfn with the
    same content, holes included, as one call does; the audit holds at every
    step in between."""
    from hvshare.hvcore import images
    n = 100
    holes = [3, 40, 41, 99]
    one = hv.create_domain(n, content=images.clone_content(7, 1, n), holes=holes)
    b = hv.begin_domain(n, content=images.clone_content(7, 1, n), holes=holes)
    steps = 0
    while not hv.build_step(b, lambda: True, chunk_seconds=1e-9):
        steps += 1
        assert hv.audit_report() == []
    assert steps >= 2           # MIN_CHUNK_ITEMS gfns per step at least, 100 in all
    d = hv.domains[b.domid]
    assert d.tot_pages == one.tot_pages == n - len(holes)
    assert (d.p2m.type == one.p2m.type).all()
    assert (d.p2m.mfn[holes] == -1).all()
    live = np.setdiff1d(np.arange(n), holes)
    assert (hv.pool.data[d.p2m.mfn[live]] == hv.pool.data[one.p2m.mfn[live]]).all()


def test_a_domain_being_created_is_busy_and_holds_its_name_and_frames(hv):
    from hvshare.hvcore.errors import EBUSY, EEXIST
    free = hv.pool.nfree
    b = hv.begin_domain(128, name="web")
    assert hv.pool.nfree == free - 128      # reserved before any is taken
    with pytest.raises(HVError) as e:
        hv.nominate(b.domid, 0)
    assert code(e) == EBUSY and "being created" in str(e.value)
    with pytest.raises(HVError) as e:
        hv.begin_domain(4, name="web")
    assert code(e) == EEXIST
    # what is reserved cannot be taken by anyone else
    with pytest.raises(HVError) as e:
        hv.create_domain(free - 127)
    assert code(e) == ENOMEM
    hv.build_step(b, lambda: True, chunk_seconds=1e-9)
    assert 0 < b.cursor < 128 and hv.audit_report() == []
    hv.build_step(b)
    assert hv.domains[b.domid].name == "web" and hv.pool.nfree == free - 128


def test_a_cancelled_create_gives_everything_back(hv):
    free = hv.pool.nfree
    b = hv.begin_domain(100, content=pages(*range(100)))
    hv.build_step(b, lambda: True, chunk_seconds=1e-9)
    assert b.populated > 0
    hv.cancel_build(b)
    assert hv.pool.nfree == free and hv.pool.reserved == 0
    assert not hv.domains and not hv.building
    with pytest.raises(HVError):
        hv.domain(b.domid)
    d = hv.create_domain(4)
    assert d.domid == b.domid + 1           # domids are never reused


def test_bad_content_found_mid_create_cancels_it(hv):
    free = hv.pool.nfree

    def content(start, count):
        if start >= 100:
            return np.zeros((count - 1, 4096), np.uint8)
        return np.ones((count, 4096), np.uint8)
    b = hv.begin_domain(200, content=content)
    with pytest.raises(HVError) as e:
        while not hv.build_step(b, lambda: True, chunk_seconds=1e-9):
            pass
    assert code(e) == EINVAL
    assert hv.pool.nfree == free and not hv.building and not hv.domains
