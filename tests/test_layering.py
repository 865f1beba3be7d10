"""The layering rule, checked from the source: app.py -> ui -> api -> backend; backend imports none of
them nor gradio; the API imports no gradio and no ui; ui never imports torch."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [("backend", {"gradio", "ui", "api", "app"}),
                                                ("api", {"gradio", "ui", "app"}), ("ui", {"torch"})])
def test_layers(package, forbidden):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = imported_modules(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_backend_has_no_import_time_side_effects():
    """Module level holds only imports, definitions and constants: no argparse, no file reads."""
    for path in (ROOT / "backend").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} calls something at import time")
        assert "argparse" not in imported_modules(path), path


def test_only_the_cluster_code_imports_ray():
    """Without --workers Easel never imports Ray: only backend/cluster's worker, driver and registry
    (imported or called once a cluster starts) and serve_app.py do."""
    allowed = {ROOT / "backend" / "cluster" / name for name in ("worker.py", "driver.py", "registry.py")}
    allowed.add(ROOT / "serve_app.py")
    files = [ROOT / "app.py"] + [p for package in ("backend", "api", "ui") for p in (ROOT / package).rglob("*.py")]
    for path in files:
        if path not in allowed:
            assert "ray" not in imported_modules(path), f"{path.relative_to(ROOT)} imports ray"
