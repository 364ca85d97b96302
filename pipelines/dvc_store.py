"""DVC versioning of datasets under ``<project root>/data``.

The project root is a git + DVC repository; every imported dataset ``data/<name>/`` is tracked by
``data/<name>.dvc`` and pushed to a remote. The default remote is a local folder under CXR_HOME
(``get_settings().dvc_remote_dir``), written to ``.dvc/config.local`` (machine-specific, never
committed); a site points DVC at S3/MinIO with ``dvc remote add -d ...`` and that one is used.

We drive the real ``dvc`` command line (the one in the running interpreter's venv) with telemetry
off: ``core.analytics false`` / ``core.check_update false`` in ``.dvc/config`` plus
``DVC_NO_ANALYTICS`` in the environment, and DVC's site cache under CXR_HOME instead of /var/tmp.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from core.config import get_settings
from models.datasets import dataset_md5, dvc_file  # noqa: F401 - re-exported: the reading side lives with the reader

LOCAL_REMOTE_NAME = "cxr-local"


class DvcError(RuntimeError):
    """A dvc command failed; the message holds the command and DVC's own words."""


def dvc_executable() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("dvc")
    if not found:
        raise DvcError("the `dvc` command was not found next to the Python interpreter or on PATH")
    return found


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_STUDIO_OFFLINE"] = "1"
    env["DO_NOT_TRACK"] = "1"
    env["DVC_IGNORE_ISATTY"] = "1"
    env.setdefault("DVC_SITE_CACHE_DIR", str(get_settings().state_dir / "dvc-site-cache"))
    return env


def run_dvc(args: list[str], root: Path | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    root = Path(root or get_settings().project_root)
    proc = subprocess.run([dvc_executable(), *args], cwd=root, env=dvc_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}): {detail}")
    return proc


def is_git_repo(root: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == Path(root).resolve()


def ensure_dvc_repo(root: Path | None = None) -> Path:
    """Make ``root`` a DVC repository (idempotent) with telemetry off and a default remote.

    ``dvc init`` runs as a process (``--no-scm`` outside a git repository); the config is read and
    edited in-process with DVC's own ``dvc.config.Config`` (merged system/global/repo/local
    levels, the same rules as ``dvc config``), which saves several slow ``dvc`` start-ups.
    """
    root = Path(root or get_settings().project_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".dvc").is_dir():
        args = ["init", "-q"] if is_git_repo(root) else ["init", "-q", "--no-scm"]
        run_dvc(args, root)
    from dvc.config import Config

    config = Config(str(root / ".dvc"))
    repo_core = config.load_one("repo").get("core", {})
    if any(str(repo_core.get(k)).lower() != "false" for k in ("analytics", "check_update")):
        with config.edit("repo") as conf:  # committed in .dvc/config (as `dvc config` writes it)
            conf.setdefault("core", {})["analytics"] = "false"
            conf["core"]["check_update"] = "false"
    if not config.read().get("core", {}).get("remote"):
        remote_dir = get_settings().dvc_remote_dir
        remote_dir.mkdir(parents=True, exist_ok=True)
        with config.edit("local") as conf:  # .dvc/config.local: machine-specific, git-ignored
            conf.setdefault("remote", {})[LOCAL_REMOTE_NAME] = {"url": str(remote_dir)}
            conf.setdefault("core", {})["remote"] = LOCAL_REMOTE_NAME
    return root


def default_remote(root: Path) -> str | None:
    from dvc.config import Config

    return Config(str(Path(root) / ".dvc")).read().get("core", {}).get("remote") or None


def track_dataset(name: str, root: Path | None = None, push: bool = True) -> str:
    """``dvc add data/<name>`` (+ ``dvc push``); returns the dataset's DVC md5."""
    root = ensure_dvc_repo(root)
    target = root / "data" / name
    if not target.is_dir():
        raise DvcError(f"no dataset folder {target}")
    run_dvc(["add", "-q", f"data/{name}"], root)
    if push:
        run_dvc(["push", "-q", f"data/{name}.dvc"], root)
    return dataset_md5(name, root)


def pull_dataset(name: str, root: Path | None = None) -> None:
    """Fetch ``data/<name>`` at the version its ``.dvc`` file names (from cache or the remote)."""
    root = ensure_dvc_repo(root)
    run_dvc(["pull", "-q", f"data/{name}.dvc"], root)


def checkout_dataset(name: str, root: Path | None = None) -> None:
    """Make ``data/<name>`` match its ``.dvc`` file (after ``git checkout`` of an older version)."""
    root = ensure_dvc_repo(root)
    proc = run_dvc(["checkout", "-q", "--force", f"data/{name}.dvc"], root, check=False)
    if proc.returncode != 0:  # not in the local cache: fetch from the remote
        run_dvc(["pull", "-q", "--force", f"data/{name}.dvc"], root)


def ensure_dataset_present(name: str) -> None:
    """On a cluster each task is a fresh pod: fetch ``data/NAME`` at the version its ``.dvc`` file names.

    Locally the dataset is already in the working tree and this does nothing.
    """
    data = get_settings().data_dir
    if (data / name / "manifest.parquet").exists() or not (data / f"{name}.dvc").exists():
        return
    pull_dataset(name)
