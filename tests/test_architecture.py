"""The layering contract (``.importlinter``), checked with the real ``lint-imports``.

Layers, bottom to top: core → models → compliance → pipelines → app; each imports only layers below
it (function-level imports count), the model library imports neither compliance, pipelines, app nor
a web/database framework, and no package holds an import cycle between its modules.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "models", "compliance", "pipelines", "app")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the copy's packages shadow the installed ones
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", dst / ".importlinter")
    return dst


@pytest.fixture(scope="module", autouse=True)
def _needs_lint_imports():
    if not LINT.exists():
        pytest.fail(f"lint-imports not installed beside {sys.executable}: `make venv` installs import-linter")


def test_repository_keeps_every_contract():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    # a model module that records an audit event: the ML library must know no audit trail
    ("models/_scratch_upward.py", "from compliance.audit import record_event\n", "Lifecycle layers"),
    # governance reaching into the web application (function-level imports count too)
    ("compliance/_scratch_upward.py", "def f():\n    from app.storage import save_prediction\n", "Lifecycle layers"),
    # core is the ground layer: it imports nothing of the project above it
    ("core/_scratch_upward.py", "import pipelines.ingest\n", "Lifecycle layers"),
])
def test_a_deliberate_upward_import_breaks_the_contract(tmp_path, module, line, contract):
    root = _copy_tree(tmp_path)
    (root / module).write_text(line)
    proc = _lint(root)
    assert proc.returncode != 0, proc.stdout
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout
    assert module.replace("/", ".")[:-3] in proc.stdout  # the offending module is named


def test_a_cycle_inside_a_package_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "compliance" / "_scratch_a.py").write_text("from compliance import _scratch_b\n")
    (root / "compliance" / "_scratch_b.py").write_text("def f():\n    from compliance import _scratch_a\n")
    proc = _lint(root)
    assert proc.returncode != 0, proc.stdout
    assert "No import cycles" in proc.stdout and "BROKEN" in proc.stdout
