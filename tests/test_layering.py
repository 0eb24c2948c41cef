"""Imports follow DESIGN.md: pipeline and storage never import each other or jobs; importing does no work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pipeline": {"storage", "jobs", "dashboards"},
    "storage": {"pipeline", "jobs", "dashboards"},
    "jobs": {"dashboards"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_crosses_the_layers(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {bad}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for bad in sorted(_imported_packages(path) & FORBIDDEN[package])
    ]
    assert offenders == []


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
