"""Typed settings for every part of the system, in one place.

All mutable state lives under ``CXR_HOME`` (default ``<project root>/.cxr``) so a run can be
isolated by setting one variable. Datasets live under ``<project root>/data`` because DVC tracks
them in the repository. Every field can be set as an environment variable ``CXR_<FIELD>``.
"""
from __future__ import annotations

import os
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
    audit_hmac_key: str | None = None  # an audit key given directly (else keys under audit_key_dir)

    # Audit trail (compliance.audit): keyed HMAC chain by default; "plain" (SHA-256) is a development
    # opt-out. Keys and checkpoints live outside the database (defaults under CXR_HOME; put them on
    # another trust domain in production: docs/SECURITY.md).
    audit_mode: str = "keyed"  # keyed | plain
    audit_key_dir: Path | None = None  # default CXR_HOME/secrets/audit-keys
    audit_checkpoint_dir: Path | None = None  # default CXR_HOME/audit-checkpoints
    audit_checkpoint_seconds: float = 60.0  # the API writes a checkpoint this often (when the head moved)

    max_image_pixels: int = 40_000_000  # decompression-bomb guard (rows * columns)
    max_upload_bytes: int = 64 * 1024 * 1024
    # A multipart image part up to this size stays in memory; beyond it, it spools to a temporary
    # file. Starlette writes a spooled part through the thread pool one 64 KiB chunk at a time (a
    # thread hop per chunk: ~10 ms of an 8 MiB upload on 2 cores). Memory held per request in flight
    # is bounded by this value; only authenticated callers get past the gate that precedes the body.
    upload_memory_bytes: int = 16 * 1024 * 1024
    cache_image_size: int = 256  # side of the cached preprocessed array (pixels)
    # JPEG 2000 uploads decoded at the lowest wavelet level that still covers cache_image_size
    # (models.preprocessing.decode_dicom(target_size=...)); CXR_REDUCED_DECODE=0 forces full decoding
    reduced_decode: bool = True
    # GPU micro-batching of predictions (models.batching; CUDA only): window and largest batch
    batch_window_ms: float = 3.0
    batch_max_size: int = 16

    # failed API authentication per client address: a burst, then this many per minute (then 429)
    auth_fail_burst: int = 20
    auth_fail_per_minute: float = 10.0

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    champion_poll_seconds: float = 5.0
    vitals_ttl_hours: float = 24.0  # how long vitals sent ahead of a DICOM study are kept (PUT /v1/vitals)
    dicom_site: str | None = None  # the site whose PACS sends to the DICOM listener (its predictions' site)
    dicom_send_to: str | None = None  # AET@HOST:PORT where DICOMweb STOW-RS results are C-STORE'd (the PACS)

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

    @property
    def audit_keys_path(self) -> Path:
        return Path(self.audit_key_dir) if self.audit_key_dir else self.state_dir / "secrets" / "audit-keys"

    @property
    def audit_checkpoints_path(self) -> Path:
        return Path(self.audit_checkpoint_dir) if self.audit_checkpoint_dir else self.state_dir / "audit-checkpoints"

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
