"""The import structure: layers point one way and no module imports itself
back at run time.

Read from the source (``ast``), so the test holds for every module, not
only those a test happens to import. An import inside a function or under
``if TYPE_CHECKING:`` does not run at import time, so it neither closes a
circle nor crosses a layer at load; a layer may still never name a package
above it, even lazily.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the installed packages, lowest layer first: each may import only itself
#: and the layers before it
LAYERS = ("hvcore", "guests", "tools", "perf")
#: the hypervisor process: only its own package (and nothing installed
#: above hvcore) imports it
SERVER = "hvshare.hvcore.process"


def _modules() -> dict[str, Path]:
    out = {}
    for top in LAYERS:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["hvshare", *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            now = eager
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                now = False
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                now = False
            if isinstance(child, ast.Import):
                found.extend((a.name, now) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path, child)
                found.append((target, now))
                found.extend((f"{target}.{a.name}", now) for a in child.names)
            visit(child, now)

    visit(tree, True)
    return found


def _graph() -> tuple[dict[str, Path], dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    eager: dict[str, set[str]] = {m: set() for m in mods}
    every: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, now in _imports(m, path):
            if target not in mods:
                continue                # a name imported from a module, or not ours
            every[m].add(target)
            # a module's own packages are loaded before it (``from . import
            # x`` names its package): that is no circle
            if now and target != m and not m.startswith(target + "."):
                eager[m].add(target)
    return mods, eager, every


def test_layers_point_one_way():
    mods, _, every = _graph()
    wrong = []
    for m, targets in every.items():
        rank = LAYERS.index(m.split(".")[1])
        for t in targets:
            if LAYERS.index(t.split(".")[1]) > rank:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "imports point perf -> tools -> guests -> hvcore only:\n" + "\n".join(sorted(wrong))


def test_only_the_server_imports_the_server():
    _, _, every = _graph()
    wrong = [f"{m} imports {t}" for m, targets in every.items() for t in targets
             if (t == SERVER or t.startswith(SERVER + ".")) and not (m == SERVER or m.startswith(SERVER + "."))]
    assert not wrong, "the hypervisor process's package is imported from outside:\n" + "\n".join(sorted(wrong))


def test_no_import_circle_at_run_time():
    mods, eager, _ = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:          # Tarjan, iterative over the edges
        work = [(v, iter(sorted(eager[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            advanced = False
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(eager[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    circles.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            strongconnect(m)
    assert not circles, "modules that import each other at run time:\n" + "\n".join(
        " <-> ".join(c) for c in circles)
