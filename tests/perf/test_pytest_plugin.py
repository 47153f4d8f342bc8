"""The pytest plugin (:mod:`hvshare.perf.pytest_plugin`) as a user's project sees it.

Each test writes a small project of its own (a test file, no conftest) and
runs pytest on it in a subprocess. The plugin reaches that run the way it
reaches a user's: through the installed distribution's ``pytest11`` entry
point, which must be the one pyproject.toml declares.
"""
from __future__ import annotations

import os
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from hvshare.perf.peers import ksm_sysfs

try:                                   # Python 3.11+
    import tomllib
except ModuleNotFoundError:            # Python 3.10: the same parser, as tomli
    tomllib = pytest.importorskip("tomli")

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_project(pytester, monkeypatch):
    """``pytester`` whose subprocess runs load plugins as a user's do."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return pytester


def test_the_installed_entry_point_is_the_declared_one():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="pytest11") if ep.name == "hvshare"}
    assert installed == declared == {"hvshare": "hvshare.perf.pytest_plugin"}


USES_A_HYPERVISOR = """
    import pytest

    def test_shares_and_counts(hvshare):
        a = hvshare.create(pages=64, workload="clone", seed=1)
        b = hvshare.create(pages=64, workload="clone", seed=1)
        assert hvshare.range_share(a, b, 0, 63) == 64
        info = hvshare.info()
        assert info["frames_total"] == 8192
        assert info["nr_shared_mfns"] == 64 and info["nr_saved_mfns"] == 64

    @pytest.mark.hvshare(frames=4096, rmap="index")
    def test_marker_options(hvshare):
        info = hvshare.info()
        assert (info["frames_total"], info["rmap"]) == (4096, "index")

    @pytest.mark.hvshare(frames=4096, rmap="index")
    @pytest.mark.parametrize("hvshare", [{"frames": 2048}], indirect=True)
    def test_parameter_over_marker(hvshare):
        info = hvshare.info()
        assert (info["frames_total"], info["rmap"]) == (2048, "index")
"""


def test_a_users_project_gets_a_running_hypervisor(user_project):
    user_project.makepyfile(USES_A_HYPERVISOR)
    result = user_project.runpytest_subprocess("-v")
    result.assert_outcomes(passed=3)


def test_p_hvshare_loads_it_where_autoloading_is_off(user_project, monkeypatch):
    user_project.makepyfile(USES_A_HYPERVISOR)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    user_project.runpytest_subprocess("-p", "hvshare").assert_outcomes(passed=3)


def test_p_no_hvshare_makes_the_fixture_unknown(user_project):
    user_project.makepyfile("def test_x(hvshare):\n    pass\n")
    result = user_project.runpytest_subprocess("-p", "no:hvshare")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'hvshare' not found*"])


def test_a_run_is_left_alone_until_a_test_uses_the_plugin(user_project, tmp_path, monkeypatch):
    user_project.makepyfile("""
        import ctypes, os
        from hvshare.tools import session

        SOCKET_BEFORE = os.environ.get("HVSHARE_SOCKET")

        def subreaper():
            flag = ctypes.c_int(-1)
            ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)   # PR_GET_CHILD_SUBREAPER
            return flag.value

        def test_1_untouched():
            assert session.SESSION_ROOT is None and subreaper() == 0
            assert os.environ.get("HVSHARE_SOCKET") == SOCKET_BEFORE

        def test_2_private_root(hvshare):
            root = session.SESSION_ROOT
            assert os.path.basename(root).startswith("hvs-pytest-") and subreaper() == 1
            assert hvshare.socket_path.startswith(root + os.sep)
            assert os.environ["HVSHARE_SOCKET"].startswith(root + os.sep)
            with open(os.environ["TEST_ROOT_FILE"], "w") as f:
                f.write(root)
    """)
    root_file = tmp_path / "root"
    monkeypatch.setenv("TEST_ROOT_FILE", str(root_file))
    user_project.runpytest_subprocess().assert_outcomes(passed=2)
    assert not os.path.exists(root_file.read_text())       # removed at the end of the run


LEAKS_A_PROCESS = """
    import subprocess, sys

    def test_leaks({fixture}):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def test_clean({fixture}):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


@pytest.mark.parametrize("opt_in", ["ini", "fixture"])
def test_a_test_that_leaks_a_process_fails_with_the_leak(user_project, opt_in):
    if opt_in == "ini":
        user_project.makeini("[pytest]\nhvshare_leak_check = true\n")
    user_project.makepyfile(textwrap.dedent(LEAKS_A_PROCESS).format(
        fixture="" if opt_in == "ini" else "hvshare_leaks"))
    result = user_project.runpytest_subprocess()
    result.assert_outcomes(passed=2, errors=1)          # test_leaks passes, then fails its teardown
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*",
                                 "the test left behind: processes * (*python* -c import time; time.sleep(60))"])
    # the checker killed the process: nothing was re-parented to this run
    # (a child subreaper, whose own leak check would fail this test)


def test_the_leak_check_is_off_unless_asked_for(user_project):
    user_project.makepyfile("""
        import subprocess, sys

        def test_leaks_unchecked():
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            with open("leaked.pid", "w") as f:
                f.write(str(p.pid))
    """)
    result = user_project.runpytest_subprocess()
    try:
        result.assert_outcomes(passed=1)
    finally:
        pid = int((user_project.path / "leaked.pid").read_text())
        os.kill(pid, 9)
        with pytest.raises(ChildProcessError):   # reaped here if re-parented to this run
            while True:
                os.waitpid(pid, 0)


KSM_TEST = """
    import os, pathlib
    import pytest
    from hvshare.perf.peers import ksm_session, ksm_sysfs

    ksm_sysfs.KSM_DIR = pathlib.Path(os.environ["TEST_KSM_DIR"])
    ksm_session.LOCK_PATH = os.environ["TEST_KSM_LOCK"]

    @pytest.mark.ksm(pages_to_scan=1234)
    def test_knobs():
        assert ksm_sysfs.read_knob("pages_to_scan") == "1234"
        ksm_sysfs.write_knob("sleep_millisecs", 5)
"""


@pytest.fixture
def ksm_dir(tmp_path, monkeypatch):
    """A directory that stands for /sys/kernel/mm/ksm in the user's run."""
    d = tmp_path / "ksm"
    d.mkdir()
    monkeypatch.setenv("TEST_KSM_DIR", str(d))
    monkeypatch.setenv("TEST_KSM_LOCK", str(tmp_path / "ksm.lock"))
    return d


def test_a_ksm_test_is_skipped_where_ksm_is_absent(user_project, ksm_dir):
    user_project.makepyfile(KSM_TEST)
    result = user_project.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*KSM absent: {ksm_dir} does not exist*"])


@pytest.mark.skipif(os.geteuid() != 0, reason="KSM knobs are writable by root only")
def test_a_ksm_test_runs_with_its_knobs_and_they_come_back(user_project, ksm_dir):
    for name, value in {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20"}.items():
        (ksm_dir / name).write_text(value + "\n")
    (ksm_dir / "full_scans").write_text("0\n")
    (ksm_dir / "full_scans").chmod(0o444)
    user_project.makepyfile(KSM_TEST)
    user_project.runpytest_subprocess().assert_outcomes(passed=1)
    assert [(ksm_dir / n).read_text().strip() for n in ("run", "pages_to_scan", "sleep_millisecs")] \
        == ["0", "100", "20"]


KSM_REASON = ksm_sysfs.ksm_available()


@pytest.mark.skipif(KSM_REASON is not None, reason=KSM_REASON or "")
def test_a_ksm_test_on_the_real_knobs_leaves_them_as_they_were(user_project):
    before = {k: ksm_sysfs.read_knob(k) for k in ksm_sysfs.writable_knobs()}
    changed = str(int(before["pages_to_scan"]) + 1)
    user_project.makepyfile(f"""
        import pytest
        from hvshare.perf.peers import ksm_sysfs

        @pytest.mark.ksm(pages_to_scan={changed})
        def test_knobs():
            assert ksm_sysfs.read_knob("pages_to_scan") == "{changed}"
    """)
    user_project.runpytest_subprocess().assert_outcomes(passed=1)
    assert {k: ksm_sysfs.read_knob(k) for k in ksm_sysfs.writable_knobs()} == before
