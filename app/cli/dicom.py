"""``cxr dicom listen``: the hospital DICOM listener (see app/dicom/listener.py and docs/DEPLOYMENT.md)."""
from __future__ import annotations

import typer

dicom_app = typer.Typer(help="Hospital DICOM integration: receive studies from a PACS, send results back.",
                        no_args_is_help=True)

DEFAULT_ANALYSE = "app.dicom.analysis:make_analyse"


def load_factory(spec: str):
    """``module:function`` -> the function (an ``analyse`` factory taking no arguments)."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise typer.BadParameter(f"--analyse {spec!r}: expected MODULE:FUNCTION")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"--analyse {spec!r}: {type(exc).__name__}: {exc}") from None


@dicom_app.command("listen")
def listen(
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (0.0.0.0 on the hospital network)"),
    port: int = typer.Option(11112, "--port", help="DICOM port the PACS sends to"),
    ae_title: str = typer.Option("CXR-AI", "--ae-title", help="this listener's AE title (called AE of the PACS)"),
    send_to: str = typer.Option(..., "--send-to", help="destination of the results: AE_TITLE@HOST:PORT"),
    spool: str = typer.Option(None, "--spool", help="spool folder (default $CXR_HOME/dicom-spool)"),
    metrics_port: int = typer.Option(0, "--metrics-port", help="serve Prometheus /metrics on this port (0: off)"),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host"),
    workers: int = typer.Option(1, "--workers", min=1, max=8, help="analysis threads"),
    send_attempts: int = typer.Option(5, "--send-attempts", min=1, help="C-STORE attempts per batch"),
    requeue_delay: float = typer.Option(30.0, "--requeue-delay", help="seconds before an undelivered batch is tried "
                                        "again (doubles per failure, up to 15 min)"),
    analyse: str = typer.Option(DEFAULT_ANALYSE, "--analyse", help="MODULE:FUNCTION returning analyse(data, "
                                "accession) (default: the registry's champion)"),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Receive CR/DX studies (C-STORE, C-ECHO); send a TID 1500 SR + Grad-CAM secondary capture per image to --send-to."""
    import logging
    import signal
    from pathlib import Path

    from app.dicom.listener import DicomListener
    from app.dicom.sender import Destination
    from core.config import get_settings

    # Only this system's loggers ("cxr.*", written to carry no patient data) log at --log-level:
    # libraries log UIDs and header values at INFO (pynetdicom, highdicom), so only their warnings pass.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cxr").setLevel(getattr(logging, log_level.upper(), logging.INFO))
    try:
        destination = Destination.parse(send_to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--send-to") from None
    if not 1 <= len(ae_title.strip()) <= 16:
        raise typer.BadParameter("AE title: 1-16 characters", param_hint="--ae-title")
    factory = load_factory(analyse)
    spool_dir = Path(spool) if spool else get_settings().state_dir / "dicom-spool"
    if metrics_port:
        from prometheus_client import start_http_server

        from app.metrics import REGISTRY

        start_http_server(metrics_port, addr=metrics_host, registry=REGISTRY)
    try:
        fn = factory()
    except Exception as exc:  # noqa: BLE001 - a clear message, not a traceback
        typer.echo(f"error: cannot start the analysis ({type(exc).__name__}: {exc})", err=True)
        raise typer.Exit(2) from None
    listener = DicomListener(analyse=fn, spool_dir=spool_dir, destination=destination, ae_title=ae_title.strip(),
                             host=host, port=port, workers=workers, send_attempts=send_attempts,
                             requeue_delay=requeue_delay)
    try:
        listener.start()
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port} ({exc})", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"listening: {ae_title.strip()} on {host}:{listener.port}; results to {destination}", err=True)
    signal.signal(signal.SIGTERM, lambda *_: listener._stop.set())
    try:
        listener.serve_forever()
    except KeyboardInterrupt:
        listener.stop()


def register(root: typer.Typer) -> None:
    root.add_typer(dicom_app, name="dicom")
