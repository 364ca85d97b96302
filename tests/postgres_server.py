"""A real, throwaway PostgreSQL server for the tests (Debian's ``postgresql`` package, no Docker).

``PostgresServer`` runs ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/<N>/bin`` (or ``CXR_PG_BIN``) in a
fresh temporary folder, listening on 127.0.0.1 only, on a free port, with password (SCRAM-SHA-256)
authentication for TCP connections and no other network access (``pg_hba.conf`` holds 127.0.0.1/32 and
the Unix socket only; the socket lives in the temporary folder). PostgreSQL refuses to run as root: when
the tests run as root, every server command runs as the ``postgres`` system user (``runuser``) and the
folder is handed to that user. ``fsync`` is off: this is a test server and its data is thrown away.

The application connects as an ordinary role (``cxr``, not a superuser) with a password, like a
hospital deployment would; each test gets its own database (``create_database``) owned by that role, and
``stop`` removes the cluster and its folder.

Used by the session fixture ``postgres_server`` in ``tests/conftest.py``; nothing here imports the project.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
APP_ROLE = "cxr"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no way to run them) on this machine: the reason says which."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb``/``pg_ctl``: ``CXR_PG_BIN``, else the newest Debian install."""
    explicit = os.environ.get("CXR_PG_BIN")
    candidates = [Path(explicit)] if explicit else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise PostgresUnavailable("PostgreSQL server binaries not found (looked for initdb/pg_ctl in "
                              f"{explicit or '/usr/lib/postgresql/*/bin'}); install Debian's postgresql "
                              "package or set CXR_PG_BIN")


def cluster_locale() -> str:
    """``CXR_PG_LOCALE``, else en_US.UTF-8 when the machine has it (a typical hospital server's default, whose
    collation ignores punctuation: string comparisons of timestamps must still hold), else C.UTF-8."""
    if os.environ.get("CXR_PG_LOCALE"):
        return os.environ["CXR_PG_LOCALE"]
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return "en_US.UTF-8" if "en_us.utf8" in out.replace("-", "") else "C.UTF-8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path | None = None, port: int | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.superuser_password = secrets.token_urlsafe(16)
        # a password with URL-special characters: the app's URL handling must quote it
        self.app_password = "p@ss:" + secrets.token_urlsafe(12) + "/%"
        self.base: Path | None = None
        self.log_path: Path | None = None
        self._run_as: str | None = None
        self._databases: list[str] = []

    # ------------------------------------------------------------------ process plumbing
    def _cmd(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self._run_as, "--", *args] if self._run_as else args

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(args), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.log_path.read_text()[-2000:] if self.log_path and self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}"
                               f"{proc.stdout[-1000:]}\n{log}")
        return proc

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SUPERUSER)  # the system user must exist: the server runs as it
            except KeyError as exc:
                raise PostgresUnavailable("running as root and there is no 'postgres' system user to run "
                                          "the server as (PostgreSQL refuses to run as root)") from exc
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root without runuser: cannot start PostgreSQL as 'postgres'")
            self._run_as = SUPERUSER
        self.base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
        try:
            self._init_cluster()
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            raise
        try:
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.base / "data"), "-l", str(self.log_path),
                       "-o", self._server_options(), "-w", "-t", "60", "start"], timeout=90)
            self._admin(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD %s", (self.app_password,))
        except BaseException:
            self.stop()
            raise
        return self

    def _server_options(self) -> str:
        return (f"-c listen_addresses={self.host} -p {self.port} -k {self.base / 'sock'} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")

    def _init_cluster(self) -> None:
        assert self.base is not None
        data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        self.log_path = self.base / "server.log"
        self.log_path.touch()
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            for p in (self.base, sock, pwfile, self.log_path):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(self.base, 0o700)
        os.chmod(pwfile, 0o600)
        self._run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--pwfile", str(pwfile),
                   "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", f"--locale={cluster_locale()}",
                   "--no-instructions"], timeout=180)
        pwfile.unlink()
        # only loopback TCP and the private socket; nothing else may connect
        (data / "pg_hba.conf").write_text("local all all scram-sha-256\n"
                                          "host all all 127.0.0.1/32 scram-sha-256\n")

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            if (self.base / "data" / "postmaster.pid").exists():
                self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate", "-w",
                           "stop"], timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    # ------------------------------------------------------------------ SQL
    def url(self, database: str, *, user: str = APP_ROLE, password: str | None = None,
            driver: str = "postgresql+psycopg") -> str:
        password = self.app_password if password is None and user == APP_ROLE else (
            password or self.superuser_password)
        return f"{driver}://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str, params: tuple = (), database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, password=self.superuser_password,
                             dbname=database, autocommit=True, connect_timeout=10) as conn:
            with psycopg.ClientCursor(conn) as cur:  # utility statements take no server-side parameters
                cur.execute(sql, params)

    def create_database(self, prefix: str = "cxr_test") -> tuple[str, str]:
        """A new empty database owned by the application role: ``(name, SQLAlchemy URL)``."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}".lower()
        self._admin(f'CREATE DATABASE "{name}" OWNER {APP_ROLE} TEMPLATE template0')
        self._databases.append(name)
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._databases:
            self._databases.remove(name)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

