"""``cxr data import / versions / add-batch``: registered on the ``data`` group by app.cli.data.

Usage from the data group's module::

    from app.cli.data_import import register_data_commands
    register_data_commands(data_app)
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def _run_and_report(write, name: str, what: str, as_json: bool) -> None:
    """Run an import-like ``write()`` (returns an ImportSummary); turn its errors into messages; print the summary."""
    from pipelines.dvc_store import DvcError
    from pipelines.ingest import DatasetImportError, print_summary

    try:
        summary = write()
    except DatasetImportError as exc:
        _fail(str(exc))
    except DvcError as exc:
        _fail(f"the {what} was written to data/{name} but DVC versioning failed: {exc}")
    except ImportError as exc:
        _fail(f"a required module is missing: {exc}")
    except OSError as exc:
        _fail(f"cannot read or write files: {exc}")
    if as_json:
        out = summary.counts()
        out["near_duplicate_pairs"] = list(getattr(summary, "near_duplicate_pairs", []) or [])
        print(json.dumps(out, sort_keys=True))
    else:
        print_summary(summary, console)


def register_data_commands(data_app: typer.Typer) -> None:
    @data_app.command("import")
    def import_cmd(
        source: Path = typer.Argument(..., help="DICOM folder (+ vitals.csv) or the public collection (metadata.csv + images/)"),
        name: str = typer.Option(..., "--name", help="dataset name: writes data/NAME/"),
        seed: int = typer.Option(42, "--seed", help="seed of the patient-level split"),
        as_user: str | None = typer.Option(None, "--as", help="acting user (else CXR_USER, else OS user)"),
        tag: str | None = typer.Option(None, "--tag", help="variant tag stored on every row"),
        force: bool = typer.Option(False, "--force", help="replace an existing dataset of that name"),
        no_dvc: bool = typer.Option(False, "--no-dvc", help="do not dvc add/push (not recommended)"),
        workers: int | None = typer.Option(None, "--workers", help="decode processes (default 2, or CXR_INGEST_WORKERS)"),
        as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
        source_name: str | None = typer.Option(
            None, "--source", help="provider/collection the images come from (recorded per image; decides, with "
                                   "sites and images, whether the dataset can be external validation). Default: the "
                                   "index's `source` column, else the layout (dicom / covid-chestxray-dataset)"),
    ) -> None:
        """Validate, de-identify, dedupe, label and split SOURCE into data/NAME, then DVC-track it."""
        from pipelines.ingest import import_dataset

        _run_and_report(lambda: import_dataset(source, name, seed=seed, actor=as_user, tag=tag, track=not no_dvc,
                                               force=force, workers=workers, quiet=as_json,
                                               source_name=source_name),
                        name, "dataset", as_json)

    @data_app.command("add-batch")
    def add_batch_cmd(
        source: Path = typer.Argument(..., help="DICOM folder (+ vitals.csv) or public-collection layout"),
        to: str = typer.Option(..., "--to", help="existing dataset to extend"),
        tag: str = typer.Option(..., "--tag", help="variant tag of the new batch (e.g. a variant name)"),
        seed: int = typer.Option(42, "--seed"),
        as_user: str | None = typer.Option(None, "--as"),
        no_dvc: bool = typer.Option(False, "--no-dvc"),
        workers: int | None = typer.Option(None, "--workers"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Append a labelled batch: new patients are split by patient, existing rows keep their split."""
        from pipelines.ingest import add_batch

        _run_and_report(lambda: add_batch(source, to, tag=tag, seed=seed, actor=as_user, track=not no_dvc,
                                          workers=workers, quiet=as_json),
                        to, "batch", as_json)

    @data_app.command("versions")
    def versions_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
        """Datasets under data/ with their DVC hash, rows and git commit."""
        from rich.table import Table

        from models.datasets import list_datasets

        try:
            items = list_datasets()
        except Exception as exc:  # unreadable manifest etc.: a message, not a traceback
            _fail(f"cannot list datasets: {exc}")
        if as_json:
            print(json.dumps(items, sort_keys=True, default=str))
            return
        if not items:
            console.print("no datasets under data/ (import one with `cxr data import SOURCE --name NAME`)")
            return
        table = Table(title="datasets (version = DVC md5 + git commit)")
        table.add_column("name", overflow="fold")
        table.add_column("DVC md5", no_wrap=True, min_width=36)
        for col in ("rows", "rej.", "train/val/test"):
            table.add_column(col, no_wrap=True)
        table.add_column("commit", no_wrap=True)
        for it in items:
            s = it.get("by_split") or {}
            commit = it["git_commit"] or "unknown"
            md5 = it["dvc_md5"] or "untracked"
            if not it["present"]:
                md5 += " (not checked out: dvc pull)"
            table.add_row(it["name"], md5, str(it["rows"] if it["rows"] is not None else "-"),
                          str(it["rejected"] if it["rejected"] is not None else "-"),
                          "/".join(str(s.get(k, 0)) for k in ("train", "val", "test")),
                          commit[:10] + ("*" if commit.endswith("-dirty") else ""))
        (console if console.is_terminal else Console(width=110)).print(table)
