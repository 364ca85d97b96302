"""``cxr serve [--host 127.0.0.1] [--port 8000]``: run the hospital API with uvicorn."""
from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    @root.command("serve")
    def serve(
        host: str = typer.Option(None, "--host", help="bind address (default 127.0.0.1, CXR_API_HOST)"),
        port: int = typer.Option(None, "--port", help="TCP port (default 8000, CXR_API_PORT)"),
        log_level: str = typer.Option("info", "--log-level"),
    ) -> None:
        """Serve the hospital API (loads the approved champion; /readyz turns ready once it is loaded)."""
        import uvicorn

        from core.config import get_settings

        s = get_settings()
        uvicorn.run("app.main:app_factory", factory=True, host=host or s.api_host, port=port or s.api_port,
                    log_level=log_level, access_log=False)
