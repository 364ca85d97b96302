"""Schema migrations of the app database (Alembic owns the schema; ``cxr db upgrade`` applies them).

* A fresh, empty database is created by running every migration (``get_engine`` does this on first
  use, so development and tests need no extra step).
* A database at an older revision is **not** upgraded behind anyone's back: ``get_engine`` raises
  ``SchemaOutdated`` naming ``cxr db upgrade``, and the API refuses to start on it. Upgrading a
  hospital's database is an operator's decision (backup first).
* A database made by the last release before migrations (tables, no version table) is recognised
  and stamped at ``0001`` (its schema) before upgrading.
* Concurrent first use by several processes (API replicas, a CLI) is serialised: PostgreSQL takes an
  advisory lock; SQLite a file lock beside the database file.

The version table is ``cxr_alembic_version``, not Alembic's default, so the app schema and MLflow's
own Alembic-managed tables can share one PostgreSQL database.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

VERSION_TABLE = "cxr_alembic_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema of the last release made by create_all
_LOCK_KEY = int.from_bytes(b"cxrmigr8", "big") >> 1


class SchemaOutdated(RuntimeError):
    """The database's schema is older than this code's: run ``cxr db upgrade``."""


def _config(connection: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


_ALEMBIC_RUNTIME = threading.RLock()


def serialise_alembic_commands() -> None:
    """Make Alembic's command-level runtime one-at-a-time within this process (idempotent).

    ``alembic.command.upgrade/downgrade/stamp`` install module-global proxies (``alembic.context``,
    ``alembic.op``) for the duration of a run: two runs in two threads of one process corrupt each
    other (``KeyError: 'script'``). MLflow runs its own migrations through the same functions when it
    opens a new tracking database, e.g. in the API's champion poller, while ``cxr db upgrade`` or a
    test upgrades the app database. Wrapping the functions on the ``alembic.command`` module makes every
    in-process caller (MLflow looks them up there at call time) take one lock."""
    from alembic import command

    for name in ("upgrade", "downgrade", "stamp"):
        fn = getattr(command, name)
        if getattr(fn, "_cxr_serialised", False):
            continue

        def serialised(*args, _fn=fn, **kwargs):
            with _ALEMBIC_RUNTIME:
                return _fn(*args, **kwargs)

        serialised._cxr_serialised = True  # type: ignore[attr-defined]
        serialised.__wrapped__ = fn  # type: ignore[attr-defined]
        serialised.__doc__ = fn.__doc__
        setattr(command, name, serialised)


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def current_revision(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _is_legacy(conn: Connection) -> bool:
    """Tables of the pre-migration release but no version table."""
    insp = inspect(conn)
    return insp.has_table("audit_trail") and not insp.has_table(VERSION_TABLE)


def _is_empty(conn: Connection) -> bool:
    return not inspect(conn).get_table_names()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
                conn.commit()
        return
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:":
        yield
        return
    import fcntl

    fd = os.open(f"{db}.migrate.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def status(engine: Engine) -> dict:
    """``{"current", "head", "state"}``; state: ``empty``, ``legacy`` (pre-migration release),
    ``outdated``, ``current`` or ``ahead`` (a newer code's database)."""
    head = head_revision()
    with engine.connect() as conn:
        if _is_empty(conn):
            return {"current": None, "head": head, "state": "empty"}
        if _is_legacy(conn):
            return {"current": None, "head": head, "state": "legacy"}
        cur = current_revision(conn)
    if cur == head:
        state = "current"
    else:
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
        state = "outdated" if cur in known or cur is None else "ahead"
    return {"current": cur, "head": head, "state": state}


def upgrade(engine: Engine, revision: str = "head") -> dict:
    """Create or upgrade the schema to ``revision``; returns ``{"from", "to"}``."""
    with _migration_lock(engine):
        return _upgrade_locked(engine, revision)


def _upgrade_locked(engine: Engine, revision: str = "head") -> dict:
    from alembic import command

    serialise_alembic_commands()

    before = status(engine)
    with engine.begin() as conn:
        cfg = _config(conn)
        if before["state"] == "legacy":
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, revision)
    return {"from": before["current"] or (BASELINE if before["state"] == "legacy" else None),
            "to": status(engine)["current"]}


def _create_at_head(engine: Engine) -> None:
    """An empty database: the tables as ``core.schema`` defines them, stamped at the head revision.

    Alembic's recipe for a fresh database, done without Alembic's runtime: its ``EnvironmentContext``
    keeps module-global proxies that are not thread-safe, and a server process may create its database
    in one thread while MLflow runs its own Alembic migrations in another. ``tests/test_migrations.py``
    checks that the migrations build exactly these tables, so both paths give one schema.
    """
    from sqlalchemy import Column, MetaData, String, Table

    from core.schema import Base

    version = Table(VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True))
    with engine.begin() as conn:
        Base.metadata.create_all(conn)
        version.create(conn)
        conn.execute(version.insert().values(version_num=head_revision()))


def ensure_schema(engine: Engine) -> None:
    """On first use: create an empty database; refuse an outdated one (``SchemaOutdated``)."""
    serialise_alembic_commands()  # before any thread of this process opens a new MLflow database
    st = status(engine)
    if st["state"] == "current":
        return
    if st["state"] == "empty":
        with _migration_lock(engine):
            if status(engine)["state"] == "empty":  # another process may have created it meanwhile
                _create_at_head(engine)
        return
    if st["state"] == "ahead":
        raise SchemaOutdated(f"the app database is at schema revision {st['current']}, newer than this code's "
                             f"{st['head']}: run the matching release")
    raise SchemaOutdated(f"the app database schema is outdated (revision {st['current'] or 'pre-migration'}, "
                         f"this code needs {st['head']}): back it up, then run `cxr db upgrade`")
