"""The transport floor for ``api_latency.py --floor``: a FastAPI app that accepts the same multipart
upload as ``POST /v1/predictions`` (image part + vitals + site) on the same uvicorn, reads the image
and answers at once: no authentication, decoding, inference, storage or audit. What the hospital API
costs beyond raw decode + forward minus what this costs is the API's own fixed cost."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build() -> FastAPI:
    from app.main import _keep_uploads_in_memory_up_to
    from core.config import Settings

    _keep_uploads_in_memory_up_to(Settings().upload_memory_bytes)  # the same parser limit as the API
    app = FastAPI()

    @app.post("/v1/predictions")
    def accept(image: Annotated[UploadFile, File()], vitals: Annotated[str | None, Form()] = None,
               site: Annotated[str | None, Form()] = None) -> dict:
        return {"bytes": len(image.file.read())}

    return app
