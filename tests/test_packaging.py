"""hvshare as users install it: one ``hvshare`` namespace, and nothing that
takes a generic top-level name (``tools``, ``perf``, ``guests``) from a
user's own project."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("hvcore", "guests", "tools", "perf")


def _readme_plugin_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Testing your own code against hvshare"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_package_folder_is_installed():
    """pyproject lists its packages by hand (a folder maps to a name under
    hvshare): a package folder left out would be missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"] == {f"hvshare.{f}": f for f in FOLDERS}
    on_disk = {"hvshare." + ".".join(p.parent.relative_to(ROOT).parts)
               for f in FOLDERS for p in (ROOT / f).rglob("__init__.py")}
    assert set(conf["packages"]) == on_disk


def _user_project(root: Path) -> Path:
    """A project whose own packages are called tools, perf, guests and
    hvcore, with the README's plugin example as one of its tests."""
    for name in ("tools", "perf", "guests", "hvcore"):
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"OWNER = 'user'\nNAME = {name!r}\n")
    (root / "tools" / "helpers.py").write_text("def answer():\n    return 42\n")
    (root / "test_readme_example.py").write_text(_readme_plugin_example())
    (root / "test_own_packages.py").write_text(textwrap.dedent("""
        import guests, hvcore, perf, tools
        from tools.helpers import answer

        def test_the_users_packages_are_the_users():
            assert {m.OWNER for m in (tools, perf, guests, hvcore)} == {"user"}
            assert answer() == 42
    """))
    return root


def _run_user_project(python: str, root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    p = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout
    assert "test_clones_dedup" in p.stdout


def test_a_user_project_with_its_own_tools_perf_and_guests(tmp_path):
    """The README's plugin example, run by pytest in a project whose own
    packages are called tools, perf, guests and hvcore."""
    _run_user_project(sys.executable, _user_project(tmp_path))


@pytest.mark.slow
def test_a_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """A non-editable install: the wheel in a fresh virtual environment (no
    access to this checkout), then hvctl, ``python -m`` and the plugin from
    a user's project directory. CI runs it (``pytest -m slow``)."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    wheel = next(wheels.glob("hvshare-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "-q", f"{wheel}[test]"], check=True,
                   capture_output=True, timeout=600)
    project = _user_project(tmp_path / "project")
    where = subprocess.run([python, "-c", "import hvshare.hvcore as h; print(h.__file__)"], cwd=project,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where
    for cmd in ([str(venv / "bin" / "hvctl"), "--version"], [python, "-m", "hvshare.perf", "--help"]):
        assert subprocess.run(cmd, cwd=project, capture_output=True, timeout=120).returncode == 0, cmd
    _run_user_project(python, project)


@pytest.mark.parametrize("cmd", [
    ["-m", "hvshare.tools.hvctl", "--version"],
    ["-m", "hvshare.perf", "--help"],
    ["-m", "hvshare.hvcore.process", "--help"],
])
def test_python_m_from_any_directory(tmp_path, cmd):
    (tmp_path / "tools").mkdir()                # a user's folder of that name is no obstacle
    (tmp_path / "tools" / "__init__.py").write_text("raise ImportError('the user tools')\n")
    p = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
