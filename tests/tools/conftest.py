"""What the hvctl tests share: ``hvctl``, a function that runs ``python -m
hvshare.tools.hvctl ARGS --socket PATH`` on a private socket as a user would (the
hypervisor it started is stopped afterwards). A module with a richer
``hvctl`` of its own overrides it."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from hvshare.tools import session


@pytest.fixture
def hvctl():
    d = tempfile.mkdtemp(prefix="cli-", dir=session.SESSION_ROOT)
    sock = os.path.join(d, "hv.sock")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", sock],
                              capture_output=True, text=True, timeout=60)
    yield run
    run("stop")
    shutil.rmtree(d, ignore_errors=True)
