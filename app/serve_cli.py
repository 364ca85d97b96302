"""Command group placeholder: filled in by its package."""
import typer


def register(root: typer.Typer) -> None:
    pass
