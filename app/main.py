"""The hospital API (FastAPI): ``create_app(settings=None)``; OpenAPI at ``/openapi.json``.

Research software, not a medical device. Layout:

* ``app.api.predictions`` / ``app.api.outcomes`` / ``app.api.model`` / ``app.api.audit`` /
  ``app.api.health`` — one router per resource;
* ``app.auth`` — bearer tokens → role, permission table, per-request audit (``api.request``);
* ``app.problems`` — RFC 9457 problem+json for every error, upload-size limit;
* ``app.services.predictions`` — the one prediction service every entry point calls;
* ``app.services.champion`` — the champion, loaded at start (warm-up) and switched atomically when the
  MLflow alias moves;
* ``app.services.audit_checkpoints`` — the periodic audit checkpoint (outside the database);
* ``app.storage`` — predictions and outcomes (no PHI), committed before a 200;
* ``app.metrics`` — Prometheus metrics (monitoring package).
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from core.config import Settings, get_settings

log = logging.getLogger("cxr.api")


def _keep_uploads_in_memory_up_to(n_bytes: int) -> None:
    """Multipart parts up to ``n_bytes`` stay in memory (``Settings.upload_memory_bytes``). FastAPI
    parses the form itself, so the only hook is the parser class's spool limit (process-wide: the
    last app built in a process sets it; a server process builds one)."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = max(int(n_bytes), 1024 * 1024)


def create_app(settings: Settings | None = None, *, model_service=None) -> FastAPI:
    """Build the API. ``settings`` gives the limits (upload bytes, image pixels, cache size) and the
    champion poll interval; state (database, MLflow) is located by ``get_settings()`` as everywhere
    else. ``model_service`` defaults to a ``ModelService`` polling the ``champion`` alias."""
    from app.api import audit, dicomweb, health, model, outcomes, predictions, vitals
    from app.auth import AuthGateMiddleware, RequestAuditMiddleware
    from app.problems import UploadLimitMiddleware, install_problem_handlers
    from app.services.audit_checkpoints import AuditCheckpointer
    from app.services.champion import ModelService
    from app.services.predictions import InputCache, PredictionService

    settings = settings or get_settings()
    svc = model_service or ModelService(poll_seconds=settings.champion_poll_seconds,
                                        image_size=settings.cache_image_size)

    checkpointer = AuditCheckpointer(settings.audit_checkpoint_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from core.db import get_engine
        from core.migrate import SchemaOutdated

        try:
            get_engine()  # a fresh database is created; an outdated schema stops the API here
        except SchemaOutdated as exc:
            log.error("refusing to start: %s", exc)
            raise
        svc.start()
        checkpointer.start()
        try:
            yield
        finally:
            checkpointer.stop()
            svc.stop()

    app = FastAPI(
        title="COVID-19 chest X-ray + vitals API",
        version="1.0.0",
        description="Hospital API of the covid-cxr reference system. Research software: NOT a medical device. "
                    "Errors are RFC 9457 application/problem+json. Auth: bearer tokens (`cxr tokens issue`).",
        lifespan=lifespan,
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.model_service = svc
    # at most this many uploads are decoded at once (each full-size decode holds ~100 MB at 2k x 2k)
    app.state.decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
    # the one prediction service: REST here, and every other entry point (DICOMweb, DICOM listener)
    app.state.predictions = PredictionService(svc, settings, input_cache=InputCache(),
                                              decode_slots=app.state.decode_slots)
    app.state.input_cache = app.state.predictions.input_cache
    install_problem_handlers(app)
    for r in (predictions.router, outcomes.router, vitals.router, dicomweb.router, model.router, audit.router,
              health.router):
        app.include_router(r)
    # innermost first. Request order: audit/metrics (sees the final status) → authentication gate
    # (401/429 before any body byte is read) → upload limit (413 while streaming) → routes
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    _keep_uploads_in_memory_up_to(settings.upload_memory_bytes)
    app.add_middleware(AuthGateMiddleware, burst=settings.auth_fail_burst, per_minute=settings.auth_fail_per_minute)
    app.add_middleware(RequestAuditMiddleware)
    from app import metrics

    metrics.set_site_filter(_configured_site_filter())
    return app


def _configured_site_filter():
    """Metric labels carry configured sites only (cached for a few seconds: one query per 5 s at most)."""
    import time

    cache: dict = {"at": -1e9, "sites": frozenset()}

    def allowed(site: str) -> bool:
        now = time.monotonic()
        if now - cache["at"] > 5.0 or (site not in cache["sites"] and now - cache["at"] > 0.5):
            from compliance.users import configured_sites

            cache["sites"], cache["at"] = frozenset(configured_sites()), now
        return site in cache["sites"]

    return allowed


def app_factory() -> FastAPI:
    """For ``uvicorn --factory app.main:app_factory``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app()
