"""Typed settings for every part of the system, in one place.

All mutable state lives under ``CXR_HOME`` (default ``<project root>/.cxr``) so a run can be
isolated by setting one variable. Datasets live under ``<project root>/data`` because DVC tracks
them in the repository. Every field can be set as an environment variable ``CXR_<FIELD>``.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

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

    # failed API authentication per client address: a burst, then this many per minute (then 429)
    auth_fail_burst: int = 20
    auth_fail_per_minute: float = 10.0

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    champion_poll_seconds: float = 5.0

    release_policy_path: Path = PACKAGE_ROOT / "compliance" / "release_policy.yaml"

    @property
    def state_dir(self) -> Path:
        home = self.home or Path(os.environ.get("CXR_HOME", self.project_root / ".cxr"))
        home = Path(home).resolve()
        if not home.exists():
            home.mkdir(mode=0o700, parents=True, exist_ok=True)  # state: database, secrets, artefacts
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

            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # created 0600 with O_EXCL (never world-readable, not even between write and chmod);
            # a concurrent first use loses the race and reads the winner's value
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32))
                    fh.flush()
                    os.fsync(fh.fileno())
        value = path.read_text().strip()
        if not value:  # a concurrent creator has not written yet
            import time

            time.sleep(0.05)
            value = path.read_text().strip()
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests change CXR_* variables between cases)."""
    get_settings.cache_clear()
