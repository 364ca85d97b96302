"""``cxr demo``: the whole lifecycle on embedded defaults (the driver is ``app.demo``)."""
from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    @root.command("demo")
    def demo(
        workdir: Path = typer.Option(None, help="workspace (default: <CXR_HOME>/demo); wiped at start"),
        patients: int = typer.Option(160, help="synthetic patients in the first cohort"),
        variant_patients: int = typer.Option(60, help="patients in the new-variant batch"),
        epochs: int = typer.Option(8),
        image_size: int = typer.Option(64, help="training image side in pixels (CPU-friendly)"),
        encoder: str = typer.Option("small", help="small | densenet121"),
        predictions: int = typer.Option(40, help="API predictions to send"),
    ) -> None:
        """Run the whole lifecycle on embedded defaults (CPU, offline) and say where everything is."""
        from app.demo import DemoFailed, run_demo
        from core.config import get_settings

        workdir = workdir or get_settings().state_dir / "demo"
        try:
            run_demo(workdir.resolve(), patients=patients, variant_patients=variant_patients, epochs=epochs,
                     image_size=image_size, encoder=encoder, predictions=predictions)
        except DemoFailed as exc:
            typer.secho(f"demo step failed: {exc}", fg="red", err=True)
            raise typer.Exit(1) from None
