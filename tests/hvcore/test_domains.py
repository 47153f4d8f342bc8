"""Creating domains: every error leaves nothing behind, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest

from hvcore import HVError
from hvcore.errors import (EINVAL, ENOMEM)


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
