"""``cxr db upgrade`` / ``cxr db status``: the app database's schema (Alembic migrations in ``core/migrations``)."""
from __future__ import annotations

import json

import typer

db_app = typer.Typer(help="The app database schema: status and upgrade (back the database up first).",
                     no_args_is_help=True)


def _engine():
    from sqlalchemy import create_engine

    from core.config import get_settings

    url = get_settings().app_database_url
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return create_engine(url, **kwargs)


@db_app.command("status")
def status_cmd(json_out: bool = typer.Option(False, "--json")) -> None:
    """The schema revision of the app database and the one this code needs; exit 0 only when current."""
    from core.migrate import status

    st = status(_engine())
    if json_out:
        typer.echo(json.dumps(st))
    else:
        typer.echo(f"schema: {st['state']} (database {st['current'] or 'none'}, code {st['head']})")
    raise typer.Exit(0 if st["state"] == "current" else 1)


@db_app.command("upgrade")
def upgrade_cmd(revision: str = typer.Option("head", "--revision", help="target revision (default: head)")) -> None:
    """Create the schema, or upgrade it (a database made before migrations is recognised and stamped)."""
    from core.migrate import status, upgrade

    engine = _engine()
    if status(engine)["state"] == "ahead":
        typer.secho("the database is at a newer schema than this code: run the matching release", fg="red", err=True)
        raise typer.Exit(1)
    out = upgrade(engine, revision)
    typer.echo(f"app database schema: {out['from'] or 'empty'} → {out['to']}")


def register(root: typer.Typer) -> None:
    root.add_typer(db_app, name="db")
