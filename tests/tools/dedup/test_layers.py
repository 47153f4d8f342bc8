"""The dedup package's own layering: its tunables sit at the bottom.

The knobs are read by the scanner, the watcher, the daemon and the command
line; if they imported any of those back, a circle would form at load.
Read from the source (``ast``), lazy imports included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import hvshare.tools.dedup.knobs as knobs


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: from the dedup package (or above it)
                found.add("hvshare.tools.dedup" if node.level == 1 else "hvshare.tools")
                if node.module:
                    found.add(("hvshare.tools.dedup." if node.level == 1 else "hvshare.tools.") + node.module)
            else:
                found.add(node.module or "")
    return found


def test_knobs_import_no_other_part_of_the_toolstack():
    imported = _imported(Path(knobs.__file__))
    ours = sorted(m for m in imported if m == "hvshare.tools" or m.startswith("hvshare.tools."))
    assert not ours, f"tools/dedup/knobs.py imports {ours}"


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom .scanner import X\nfrom hvshare.tools.dedup import watch\n"
                 "def f():\n    from . import daemon\n")
    assert _imported(f) == {"os", "hvshare.tools.dedup.scanner", "hvshare.tools.dedup"}
