"""``cxr data``: synthesise a cohort, check DICOM files (import/versions/add-batch: app.cli.data_import).

- ``cxr data synth --patients N --out DIR [--seed S] [--variant NAME] [--image-size PX] [--confound site|missingness|all]``
- ``cxr data check FILE... [--json] [--recursive] [--max-pixels N]``: per file accepted (modality,
  view, photometric, transfer syntax, shape) or refused (code + reason). Exit 0 only when every
  file is accepted, 1 when any is refused, 2 on usage errors. Never a traceback.

``--json`` prints one object: ``{"files": [{"file", "accepted", "code", "reason", "modality",
"view", "photometric", "transfer_syntax", "shape": [rows, cols], "bits_stored", "warnings"}],
"n_files", "n_accepted", "n_refused"}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(
    help="Datasets: synthesise a cohort, check DICOM files, import, version.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@data_app.command("synth")
def synth(
    patients: int = typer.Option(..., "--patients", min=1, help="Number of synthetic patients (1–3 studies each)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the DICOM files and vitals.csv."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Appearance/vitals shift, e.g. 'omicron'."),
    image_size: int = typer.Option(512, "--image-size", min=32, max=4096, help="Image rows in pixels."),
    confound: Optional[str] = typer.Option(None, "--confound",
                                           help="Make a shortcut-prone cohort: 'site' (site follows the label, site "
                                                "marker burned into the border, faint lung signal), 'missingness' "
                                                "(SpO2 recorded mostly for covid19) or 'all'."),
) -> None:
    """Write a synthetic chest X-ray + vitals cohort: real DICOM files (CR/DX, mixed encodings) + vitals.csv."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pipelines.synth import CONFOUNDS, VARIANTS, synthesize_cohort

    console = Console(stderr=True, soft_wrap=True)
    if variant and variant.strip().lower() not in VARIANTS:
        console.print(f"[red]unknown variant '{variant}'[/red]; known: {', '.join(sorted(VARIANTS))}")
        raise typer.Exit(2)
    if confound and confound.strip().lower() not in CONFOUNDS:
        console.print(f"[red]unknown confound '{confound}'[/red]; known: {', '.join(CONFOUNDS)}")
        raise typer.Exit(2)
    if out.exists() and not out.is_dir():
        console.print(f"[red]--out {out} exists and is not a folder[/red]")
        raise typer.Exit(2)
    try:
        with Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("images", total=None)
            summary = synthesize_cohort(patients, out, seed=seed, variant=variant, image_size=image_size,
                                        progress=lambda n: progress.update(task, completed=n),
                                        confound=confound)
    except (OSError, ValueError) as exc:
        console.print(f"[red]synthesis failed:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"synthetic cohort → {out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("patients", str(summary.n_patients))
    table.add_row("images", str(summary.n_images))
    for k, v in sorted(summary.by_label.items()):
        table.add_row(f"label {k}", str(v))
    for k, v in sorted(summary.by_site.items()):
        table.add_row(f"site {k}", str(v))
    for k, v in sorted(summary.by_encoding.items()):
        table.add_row(f"encoding {k}", str(v))
    Console().print(table)
    typer.echo(f"wrote {summary.n_images} DICOM files and vitals.csv to {out}" + (f" (variant {summary.variant})" if summary.variant else ""))


def check_file(path: Path, *, max_pixels: int | None = None) -> dict:
    """One file's check result (see module doc); never raises."""
    from models.preprocessing import ImageRefused, decode_dicom

    result: dict = {"file": str(path), "accepted": False, "code": None, "reason": None, "modality": None, "view": None,
                    "photometric": None, "transfer_syntax": None, "shape": None, "bits_stored": None, "warnings": []}
    try:
        decoded = decode_dicom(path, max_pixels=max_pixels)
    except ImageRefused as exc:
        result.update(code=exc.code, reason=exc.reason)
        return result
    except Exception as exc:  # noqa: BLE001 - decode_dicom should never raise anything else; be safe
        result.update(code="undecodable", reason=f"unexpected {type(exc).__name__}")
        return result
    result.update(accepted=True, modality=decoded.modality, view=decoded.view, photometric=decoded.photometric,
                  transfer_syntax=decoded.transfer_syntax, shape=list(decoded.shape), bits_stored=decoded.bits_stored,
                  warnings=list(decoded.warnings))
    return result


def _expand(paths: list[Path], recursive: bool) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if recursive and p.is_dir():
            try:
                out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
            except OSError:
                out.append(p)
        else:
            out.append(p)
    return out


@data_app.command("check")
def check(
    files: list[Path] = typer.Argument(..., help="DICOM files to check (folders with --recursive)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout, for machines."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Check every file under given folders."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="Pixel limit (default: settings)."),
) -> None:
    """Check DICOM files against the image-input contract: accepted (what was found) or refused (why)."""
    from rich.console import Console
    from rich.table import Table

    results = [check_file(p, max_pixels=max_pixels) for p in _expand(list(files), recursive)]
    n_ok = sum(r["accepted"] for r in results)
    if json_out:
        typer.echo(json.dumps({"files": results, "n_files": len(results), "n_accepted": n_ok,
                               "n_refused": len(results) - n_ok}, indent=2))
    else:
        table = Table(show_lines=False)
        for col in ("file", "result", "modality", "view", "photometric", "transfer syntax", "shape", "reason / warnings"):
            table.add_column(col, overflow="fold")
        for r in results:
            if r["accepted"]:
                table.add_row(r["file"], "[green]accepted[/green]", r["modality"], r["view"] or "?", r["photometric"],
                              r["transfer_syntax"], "x".join(map(str, r["shape"])), "; ".join(r["warnings"]))
            else:
                table.add_row(r["file"], f"[red]refused[/red] ({r['code']})", "", "", "", "", "", r["reason"])
        Console(width=200).print(table)
        typer.echo(f"{n_ok} of {len(results)} accepted")
    raise typer.Exit(0 if n_ok == len(results) and results else 1)


def register(root: typer.Typer) -> None:
    """Add the ``data`` group (synth, check; import/versions/add-batch from app.cli.data_import)."""
    global _import_commands_added
    if not _import_commands_added:
        from app.cli.data_import import register_data_commands

        register_data_commands(data_app)
        _import_commands_added = True
    root.add_typer(data_app, name="data")


_import_commands_added = False
