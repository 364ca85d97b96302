"""The ``cxr`` console script: one entry point to every capability.

One module per command group in this package (``register(root)``); heavy imports (torch, monai,
mlflow) happen inside the commands so ``cxr --help`` stays fast.
"""
from __future__ import annotations

import importlib

import typer

root = typer.Typer(
    name="cxr",
    help="COVID-19 chest X-ray + vitals reference system (research software, NOT a medical device).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# (module, purpose) — each module defines register(root: typer.Typer)
COMMAND_MODULES = [
    "app.cli.data",  # cxr data synth/check/import/versions/add-batch
    "app.cli.models",  # cxr train / evaluate
    "app.cli.governance",  # cxr users / tokens / model / audit
    "app.cli.pipeline",  # cxr pipeline compile/run/submit, cxr reproduce
    "app.cli.db",  # cxr db status / upgrade
    "app.cli.serve",  # cxr serve
    "app.cli.demo",  # cxr demo
    "app.cli.dicom",  # cxr dicom listen
]


@root.callback()
def _root() -> None:
    """COVID-19 chest X-ray + vitals reference system. Research software: NOT a medical device."""


@root.command("version")
def version() -> None:
    """Print the system version and the versions of its key components."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    for pkg in ["covid-cxr", "torch", "monai", "pydicom", "mlflow", "dvc", "kfp", "fastapi"]:
        try:
            typer.echo(f"{pkg} {v(pkg)}")
        except PackageNotFoundError:
            typer.echo(f"{pkg} not installed")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(root)


def main() -> None:
    root()


if __name__ == "__main__":
    main()
