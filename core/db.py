"""The app database engine and sessions (SQLAlchemy).

SQLite (WAL, synchronous=FULL so a committed row survives a crash) by default; PostgreSQL
through ``CXR_DATABASE_URL``. Every table is defined in ``core.schema``; the migrations in
``core/migrations`` own the schema (``core.migrate``): an empty database is created on first use, an
outdated one is refused until ``cxr db upgrade``.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import get_settings

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _sqlite_path(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        db = make_url(url).database
    except Exception:  # noqa: BLE001
        return None
    return db if db and db != ":memory:" and not db.startswith("file:") else None


def create_private_file(path: str | os.PathLike) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (``O_CREAT|O_EXCL``: created with that
    mode, never chmod-ed after the fact, so there is no window in which another account can open it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().app_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            kwargs: dict = {}
            if url.startswith("sqlite"):
                # The database holds users, token hashes, the audit trail and predictions: 0600. SQLite
                # creates its -wal and -shm files with the database file's permissions.
                path = _sqlite_path(url)
                if path:
                    create_private_file(path)
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

            from core.migrate import ensure_schema

            ensure_schema(engine)  # a fresh database is created by the migrations; an old one is refused
            _engines[url] = engine
        return engine


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
