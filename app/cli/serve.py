"""``cxr serve [--host 127.0.0.1] [--port 8000] [--ssl-certfile F --ssl-keyfile F]``: the hospital API.

The API carries patient radiographs and bearer tokens: on any network other than the loopback
interface it must be served over TLS, either here (``--ssl-certfile``/``--ssl-keyfile``, uvicorn's
own TLS) or by a reverse proxy in front (docker-compose.yml: the ``tls-proxy`` service). Binding a
non-loopback address without TLS prints a warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(root: typer.Typer) -> None:
    @root.command("serve")
    def serve(
        host: str = typer.Option(None, "--host", help="bind address (default 127.0.0.1, CXR_API_HOST)"),
        port: int = typer.Option(None, "--port", help="TCP port (default 8000, CXR_API_PORT)"),
        log_level: str = typer.Option("info", "--log-level"),
        ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate chain (PEM)"),
        ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)"),
        proxy_headers: bool = typer.Option(False, "--proxy-headers",
                                           help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (behind "
                                                "a TLS proxy: per-client rate limits then see the real client)"),
        forwarded_allow_ips: str = typer.Option("127.0.0.1", "--forwarded-allow-ips"),
    ) -> None:
        """Serve the hospital API (loads the approved champion; /readyz turns ready once it is loaded)."""
        import sys

        import uvicorn

        from core.config import get_settings

        if (ssl_certfile is None) != (ssl_keyfile is None):
            typer.echo("error: give both --ssl-certfile and --ssl-keyfile", err=True)
            raise typer.Exit(2)
        for f in (ssl_certfile, ssl_keyfile):
            if f is not None and not f.is_file():
                typer.echo(f"error: {f} is not a file", err=True)
                raise typer.Exit(2)
        s = get_settings()
        bind = host or s.api_host
        if ssl_certfile is None and bind not in ("127.0.0.1", "::1", "localhost") and not proxy_headers:
            print(f"WARNING: serving plain HTTP on {bind}: patient data and tokens travel unencrypted. Use "
                  "--ssl-certfile/--ssl-keyfile or a TLS reverse proxy (docs/DEPLOYMENT.md).", file=sys.stderr)
        kwargs = {}
        if ssl_certfile is not None:
            kwargs = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)}
        uvicorn.run("app.main:app_factory", factory=True, host=bind, port=port or s.api_port,
                    log_level=log_level, access_log=False, proxy_headers=proxy_headers,
                    forwarded_allow_ips=forwarded_allow_ips, server_header=False, **kwargs)
