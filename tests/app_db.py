"""Raw SQL on the app database, whichever backend the test runs on (SQLite or PostgreSQL).

Tests that tamper with rows "by hand" (as an attacker with database access would) go around the
application: a separate SQLAlchemy engine without pooling, ``:name`` parameters, committed at once.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool


def app_db_url() -> str:
    from core.config import get_settings

    return get_settings().app_database_url


def execute(sql: str, params: dict[str, Any] | None = None, *, url: str | None = None) -> list[tuple]:
    """Run one statement in its own transaction; rows for a SELECT, else []."""
    engine = sa.create_engine(url or app_db_url(), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            # without parameters the statement goes to the driver as written (':' and '%' are literal)
            result = conn.exec_driver_sql(sql) if params is None else conn.execute(sa.text(sql), params)
            return [tuple(r) for r in result.fetchall()] if result.returns_rows else []
    finally:
        engine.dispose()


def dump_text(url: str | None = None) -> str:
    """Everything stored in the database as text (SQLite: ``iterdump``; otherwise every row of every table)."""
    url = url or app_db_url()
    if url.startswith("sqlite"):
        import sqlite3

        con = sqlite3.connect(sa.engine.make_url(url).database)
        try:
            return "\n".join(con.iterdump())
        finally:
            con.close()
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        lines = []
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    lines.append(f"{table}: {tuple(row)!r}")
        return "\n".join(lines)
    finally:
        engine.dispose()
