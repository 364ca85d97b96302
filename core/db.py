"""The app database engine and sessions (SQLAlchemy).

SQLite (WAL, synchronous=FULL so a committed row survives a crash) by default; PostgreSQL
through ``CXR_DATABASE_URL``. Every table is defined in ``core.schema`` on the one ``Base`` and
created on first use.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import get_settings
from core.schema import Base

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().app_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            kwargs: dict = {}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            engine = create_engine(url, **kwargs)
            if url.startswith("sqlite"):

                @event.listens_for(engine, "connect")
                def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=FULL")
                    cur.execute("PRAGMA busy_timeout=30000")
                    cur.close()

            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            _engines[url] = engine
        return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add nullable columns the schema gained since a database was created (create_all adds tables,
    never columns): e.g. ``audit_trail.key_id``, ``e_signatures.artifact_sha256``."""
    from sqlalchemy import inspect

    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.nullable:
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
                with engine.begin() as conn:
                    conn.exec_driver_sql(ddl)


def dispose_engines() -> None:
    """Close every pooled connection (tests switch CXR_HOME between cases)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on error."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
