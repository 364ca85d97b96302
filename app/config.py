"""Typed settings for every part of the system, in one place.

All mutable state lives under ``CXR_HOME`` (default ``<project root>/.cxr``) so a run can be
isolated by setting one variable. Datasets live under ``<project root>/data`` because DVC tracks
them in the repository. Every field can be set as an environment variable ``CXR_<FIELD>``.
"""
from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Telemetry is off by default for every process that imports the project (STACK.md).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _default_project_root() -> Path:
    return Path(os.environ.get("CXR_PROJECT_ROOT", PACKAGE_ROOT)).resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    project_root: Path = _default_project_root()
    home: Path | None = None  # CXR_HOME; resolved in ``state_dir``

    database_url: str | None = None  # app DB (users, tokens, audit, predictions); SQLite default
    mlflow_tracking_uri: str | None = None  # falls back to MLFLOW_TRACKING_URI, then SQLite
    registered_model_name: str = "covid-cxr"

    # Secrets. Defaults are generated once per CXR_HOME and kept there (0600); a hospital sets them.
    pseudonym_key: str | None = None  # keyed hash for patient ids and accession numbers
    audit_hmac_key: str | None = None  # optional keyed audit chain (key kept outside the DB)

    max_image_pixels: int = 40_000_000  # decompression-bomb guard (rows * columns)
    max_upload_bytes: int = 64 * 1024 * 1024
    cache_image_size: int = 256  # side of the cached preprocessed array (pixels)

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    champion_poll_seconds: float = 5.0

    release_policy_path: Path = PACKAGE_ROOT / "compliance" / "release_policy.yaml"

    # Deployment prevalence of COVID-19 per site (issue 13), e.g. CXR_SITE_PREVALENCE='{"site-a": 0.05}'.
    # P(covid19) is calibrated at the model's development prevalence; for a site listed here the
    # prediction service also reports P(covid19) corrected for the site's prevalence
    # (models.statistics.prior_shift, Bayes odds correction) and records both in the prediction row.
    site_prevalence: dict[str, float] = {}

    @field_validator("site_prevalence")
    @classmethod
    def _prevalence_in_0_1(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: p for k, p in v.items() if not 0 < float(p) < 1}
        if bad:
            raise ValueError(f"site prevalence must be strictly between 0 and 1: {bad}")
        return v

    @property
    def state_dir(self) -> Path:
        home = self.home or Path(os.environ.get("CXR_HOME", self.project_root / ".cxr"))
        home = Path(home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        return home

    @property
    def data_dir(self) -> Path:
        return self.project_root / "data"

    @property
    def app_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'cxr.db'}"

    @property
    def tracking_uri(self) -> str:
        return (
            self.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.state_dir / 'mlflow.db'}"
        )

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def dvc_remote_dir(self) -> Path:
        return self.state_dir / "dvc-remote"

    def secret(self, name: str) -> str:
        """A secret from the environment, else one generated once and kept under CXR_HOME."""
        value = getattr(self, name, None)
        if value:
            return value
        path = self.state_dir / "secrets" / name
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests change CXR_* variables between cases)."""
    get_settings.cache_clear()


def acting_user(explicit: str | None = None) -> str:
    """The user an action is attributed to: ``--as``, else ``CXR_USER``, else the OS user."""
    if explicit:
        return explicit
    if os.environ.get("CXR_USER"):
        return os.environ["CXR_USER"]
    import getpass

    return getpass.getuser()


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
