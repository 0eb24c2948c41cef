"""Imports follow DESIGN.md and LAYOUT.md: layers point one way, verbs stand alone, importing does no work.

- pipeline and storage never import each other, jobs or dashboards;
- dashboards import pipeline and storage, never jobs; jobs never import dashboards;
- a verb module (``jobs/<verb>.py``) imports no other verb, except ``demo``, which is the
  composition of cache, train, index, explain, features and serve by definition;
- bench/ may use pipeline, storage and jobs (never dashboards) and is never imported by them;
- dynamic imports (``importlib.import_module("x.y")``, ``__import__``) with literal names count too;
- the modules of jobs/ import each other without a cycle (imports inside functions and under
  ``TYPE_CHECKING`` count), and the train verb's package jobs/training/ never imports the verb, jobs/train.py.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pipeline": {"storage", "jobs", "dashboards", "bench"},
    "storage": {"pipeline", "jobs", "dashboards", "bench"},
    "jobs": {"dashboards", "bench"},
    "dashboards": {"jobs", "bench"},
    "bench": {"dashboards"},
}
VERBS = {
    "trace",
    "demo",
    "cache",
    "verify",
    "train",
    "evaluate",
    "import_sae",
    "export_transcoders",
    "index",
    "explain",
    "features",
    "compare",
    "steer",
    "serve",
}
"""jobs modules that implement a `saescope` verb (the rest are helpers any verb may use)."""
COMPOSITE_VERBS = {"demo"}


def _dynamic_target(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name the file imports, statically or through importlib with a literal name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)):
            names.add(target)
    return names


def _relative_imports(path: Path) -> set[str]:
    """The absolute names of the file's relative imports (``from .x import y``), resolved from its package."""
    package = list(path.relative_to(ROOT).with_suffix("").parts)
    package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            names.add(".".join(base))
            names.update(".".join([*base, alias.name]) for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_module(name: str) -> str | None:
    """The project module an imported name lives in (its longest prefix that is a file); None for ``jobs`` itself."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        folder = ROOT.joinpath(*parts[:end])
        if folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file():
            return ".".join(parts[:end])
    return None


def import_graph(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of the same package it imports (any way, anywhere in the file)."""
    graph = {}
    for path in _python_files(package):
        names = imported_modules(path) | _relative_imports(path)
        targets = {_project_module(name) for name in names if name.split(".")[0] == package}
        graph[module_name(path)] = {t for t in targets if t is not None} - {module_name(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as the modules along it (first repeated at the end), or [] when none."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for target in sorted(graph.get(node, ())):
            if cycle := walk(target, [*path, node]):
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        if cycle := walk(start, []):
            return cycle
    return []


def _python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_crosses_the_layers(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {bad}"
        for path in _python_files(package)
        for bad in sorted({name.split(".")[0] for name in imported_modules(path)} & FORBIDDEN[package])
    ]
    assert offenders == []


def test_a_verb_imports_no_other_verb():
    offenders = []
    for verb in sorted(VERBS - COMPOSITE_VERBS):
        for name in sorted(imported_modules(ROOT / "jobs" / f"{verb}.py")):
            parts = name.split(".")
            if parts[0] == "jobs" and len(parts) > 1 and parts[1] in VERBS and parts[1] != verb:
                offenders.append(f"jobs/{verb}.py imports {name}")
    assert offenders == []


def test_every_verb_module_is_registered_by_the_cli():
    from jobs.cli import VERB_MODULES

    assert {name.removeprefix("jobs.") for name in VERB_MODULES} == VERBS
    assert all((ROOT / "jobs" / f"{verb}.py").is_file() for verb in VERBS)


def test_the_checker_sees_dynamic_and_from_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\nfrom jobs import train\nimportlib.import_module('jobs.steer')\n__import__('storage.x')\n"
    )
    assert {"jobs.train", "jobs.steer", "storage.x"} <= imported_modules(probe)


def test_jobs_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph("jobs"))
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_training_package_never_imports_the_train_verb():
    graph = import_graph("jobs")
    training = sorted(name for name in graph if name == "jobs.training" or name.startswith("jobs.training."))
    assert "jobs.training.config" in training
    assert [name for name in training if "jobs.train" in graph[name]] == []


def test_the_cycle_finder_sees_type_checking_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.top import X\n")
    (package / "top.py").write_text("def f():\n    from .low import Y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph("pkg")
    assert graph == {"pkg": set(), "pkg.low": {"pkg.top"}, "pkg.top": {"pkg.low"}}
    assert find_cycle(graph) in (["pkg.low", "pkg.top", "pkg.low"], ["pkg.top", "pkg.low", "pkg.top"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_importing_every_module_prints_nothing():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for pkg in ("pipeline", "storage", "jobs")
        for p in (ROOT / pkg).rglob("*.py")
    )
    code = "import importlib\n" + "\n".join(f"importlib.import_module({m!r})" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
