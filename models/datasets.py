"""Reading imported datasets: ``data/<name>/manifest.parquet`` + arrays, with their version.

A dataset's version is the md5 DVC recorded for ``data/<name>`` in ``data/<name>.dvc`` (the
folder's content hash: manifest, rejected records and cached arrays) plus the git commit that
holds that ``.dvc`` file. Training records ``version["dataset_version"]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import get_settings
from core.lineage import git_commit

MANIFEST = "manifest.parquet"
REJECTED = "rejected.csv"
TRAINABLE_LABELS = ("covid19", "other_pneumonia", "normal")


class DatasetNotFound(LookupError):
    pass


@dataclass
class Dataset:
    name: str
    root: Path
    manifest: pd.DataFrame
    version: dict = field(default_factory=dict)

    def array(self, row: int | pd.Series) -> np.ndarray:
        """The cached preprocessed image of a manifest row as float32 (1, 256, 256)."""
        rec = self.manifest.iloc[row] if isinstance(row, int) else row
        return np.load(self.root / rec["array_path"]).astype(np.float32)

    def split(self, name: str, trainable: bool = True) -> pd.DataFrame:
        df = self.manifest[self.manifest["split"] == name]
        if trainable:
            df = df[df["label"].isin(TRAINABLE_LABELS)]
        return df

    @property
    def metadata(self) -> dict:
        return read_manifest_metadata(self.root / MANIFEST)


def dataset_root(name: str) -> Path:
    return get_settings().data_dir / name


def read_manifest_metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"cxr", b"{}")
    return json.loads(raw)


def dvc_file(name: str, root: Path | None = None) -> Path:
    """``data/<name>.dvc``: the file DVC writes when it tracks a dataset."""
    root = Path(root or get_settings().project_root)
    return root / "data" / f"{name}.dvc"


def dataset_md5(name: str, root: Path | None = None) -> str | None:
    """The md5 DVC recorded for ``data/<name>`` (e.g. ``3f2a….dir``), or None if untracked.

    Read from the ``.dvc`` file itself (plain YAML), so reading a dataset's version needs no DVC.
    """
    import yaml

    path = dvc_file(name, root)
    if not path.exists():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    outs = doc.get("outs") or []
    return outs[0].get("md5") if outs else None


def dataset_version(name: str) -> dict:
    root = get_settings().project_root
    md5 = dataset_md5(name, root)
    return {"dvc_md5": md5, "git_commit": git_commit(root),
            "dataset_version": md5 or "untracked"}


def load_dataset(name: str) -> Dataset:
    root = dataset_root(name)
    path = root / MANIFEST
    if not path.exists():
        raise DatasetNotFound(
            f"dataset {name!r} not found: no {path}. Import one with `cxr data import SOURCE --name {name}`"
            f" or fetch it with `dvc pull data/{name}.dvc`."
        )
    manifest = pd.read_parquet(path)
    return Dataset(name=name, root=root, manifest=manifest, version=dataset_version(name))


def list_datasets() -> list[dict]:
    """Datasets under ``data/`` (imported or only DVC-tracked), with version and row counts."""
    data_dir = get_settings().data_dir
    if not data_dir.is_dir():
        return []
    names = {p.name for p in data_dir.iterdir() if p.is_dir() and (p / MANIFEST).exists()}
    names |= {p.name[:-4] for p in data_dir.glob("*.dvc")}
    out = []
    for name in sorted(names):
        path = data_dir / name / MANIFEST
        rows = rejected = None
        counts: dict = {}
        if path.exists():
            import pyarrow.parquet as pq

            rows = pq.read_metadata(path).num_rows
            meta = read_manifest_metadata(path)
            rejected = meta.get("n_rejected")
            counts = meta.get("by_split", {})
        out.append({"name": name, **dataset_version(name), "rows": rows, "rejected": rejected,
                    "by_split": counts, "present": path.exists()})
    return out
