"""Lineage: which code produced an artefact (git commit of the project checkout)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from core.config import PACKAGE_ROOT


def git_commit(root: Path | None = None) -> str:
    """The project's current git commit (``unknown`` outside a git checkout); ``-dirty`` if modified."""
    root = root or PACKAGE_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
