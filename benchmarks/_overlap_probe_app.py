"""A probe for ``api_latency.py --overlap-probe``, not a serving path: how fast could the upload be if the
decode overlapped the receive? Issue 18 part 4 asks for the API within 1.25x of raw decode + forward; the
transport alone costs about half of raw, so only overlap can get there. This app measures that bound.

``POST /v1/predictions`` (the same multipart upload as the API's) parses the body as it streams in
(``python_multipart``, no spooling) and writes the image part into one preallocated buffer. A worker
thread waits for the DICOM header, then, for each 64-row stripe of pixel data that has arrived, converts
it to float32 (bits above BitsStored masked, rescale, window) and runs Pillow's horizontal resize pass on
it. After the last byte only the vertical pass, the min–max affine (windowless files), the robust window
and the forward of the champion remain. Stripe-wise horizontal passes followed by one vertical pass give
Pillow's full resize bit for bit; the min–max applied after the resize instead of before differs by float
rounding only (``api_latency.py --overlap-probe`` checks it against ``decode_and_prepare`` first).

Limits, because it is a probe: explicit VR little endian, uncompressed, MONOCHROME2, one frame; no authentication, input gate, storage, audit or metrics (the API's own ~3-7 ms, measured
separately). Anything else is answered 415.
"""
from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the endpoint's annotation here

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STRIPE_ROWS = 64
_PIXEL_TAG = b"\xe0\x7f\x10\x00OW\x00\x00"  # (7FE0,0010) Pixel Data, explicit VR little endian, OW


class StreamingDicom:
    """Receives the image part's bytes (``feed``) and prepares the model input (``finish``) as they come.

    ``size``: side of the prepared array; ``capacity``: the most bytes the part can have (the request's
    Content-Length). Output of ``finish``: float32 (1, size, size) in [0, 1], or ``ValueError``.
    """

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.n = 0
        self.done = False
        self.cv = threading.Condition()
        self.error: Exception | None = None
        self.result: np.ndarray | None = None
        self.worker = threading.Thread(target=self._run, name="overlap-probe", daemon=True)
        self.worker.start()

    def feed(self, data: bytes) -> None:
        end = self.n + len(data)
        self.view[self.n:end] = data
        with self.cv:
            self.n = end
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.done = True
            self.cv.notify()

    def finish(self) -> np.ndarray:
        self.close()
        self.worker.join()
        if self.error is not None:
            raise self.error
        return self.result

    def _wait(self, need: int) -> int:
        with self.cv:
            while self.n < need and not self.done:
                self.cv.wait()
            return self.n

    def _run(self) -> None:
        try:
            self.result = self._prepare()
        except Exception as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def _prepare(self) -> np.ndarray:
        import pydicom
        from PIL import Image

        from models.intensity import robust_window
        from models.preprocessing import _has_voi, _to_unit_range

        have = 0
        while True:  # the header: up to the Pixel Data element and its length
            have = self._wait(have + 1)
            at = bytes(self.view[:have]).find(_PIXEL_TAG)
            if at >= 0 and have >= at + 12:
                break
            if self.done:
                raise ValueError("no explicit-VR Pixel Data element")
        ds = pydicom.dcmread(io.BytesIO(bytes(self.view[:at])), stop_before_pixels=True, force=True)
        if str(ds.file_meta.TransferSyntaxUID) != pydicom.uid.ExplicitVRLittleEndian or ds.BitsAllocated != 16 \
                or ds.get("PhotometricInterpretation") != "MONOCHROME2" or int(ds.get("PixelRepresentation", 0)) != 0 \
                or "ModalityLUTSequence" in ds:
            raise ValueError("the probe handles uncompressed MONOCHROME2 16-bit only")
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        windowed = _has_voi(ds)
        offset = at + 12
        mask = np.uint16((1 << bits) - 1)
        stripes, vmin, vmax = [], np.inf, -np.inf
        for r0 in range(0, rows, STRIPE_ROWS):
            r1 = min(rows, r0 + STRIPE_ROWS)
            if self._wait(offset + r1 * cols * 2) < offset + r1 * cols * 2:
                raise ValueError("pixel data truncated")
            stored = np.frombuffer(self.buf, dtype="<u2", count=(r1 - r0) * cols, offset=offset + r0 * cols * 2)
            stored = (stored & mask).reshape(r1 - r0, cols)
            if windowed:  # per pixel: the serving path's own rescale + window, stripe by stripe
                values, note = _to_unit_range(stored, ds, "MONOCHROME2")
                if note is not None:
                    raise ValueError(note)
            else:  # min-max needs the global extremes: rescale here, scale after the resize
                values = stored.astype(np.float32)
                if slope != 1.0:
                    values *= np.float32(slope)
                if intercept != 0.0:
                    values += np.float32(intercept)
                vmin, vmax = min(vmin, float(values.min())), max(vmax, float(values.max()))
            stripes.append(np.asarray(Image.fromarray(values).resize((self.size, r1 - r0),
                                                                     Image.Resampling.BILINEAR)))
        out = np.asarray(Image.fromarray(np.vstack(stripes)).resize((self.size, self.size), Image.Resampling.BILINEAR),
                         dtype=np.float32)
        if not windowed:
            out = (out - np.float32(vmin)) / np.float32(vmax - vmin) if vmax > vmin else np.zeros_like(out)
        return robust_window(np.clip(out, 0.0, 1.0))[None, :, :].astype(np.float32)


def build():
    import json

    import anyio
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from python_multipart.multipart import MultipartParser, parse_options_header

    from app.services.champion import champion_version
    from core.config import get_settings
    from models.preprocessing import parse_vitals
    from models.registry import load_clinical_model

    settings = get_settings()
    model = load_clinical_model(champion_version())
    app = FastAPI()

    @app.post("/v1/predictions")
    async def predict(request: Request):
        _, params = parse_options_header(request.headers.get("content-type", ""))
        length = int(request.headers.get("content-length", "0"))
        if b"boundary" not in params or length <= 0:
            return JSONResponse({"detail": "multipart with a Content-Length expected"}, status_code=415)
        sink = StreamingDicom(settings.cache_image_size, length)
        part = {"name": None, "field": b"", "value": b"", "disposition": b""}
        fields: dict[str, bytes] = {}

        def on_header_field(data, start, end):
            part["field"] += data[start:end]

        def on_header_value(data, start, end):
            part["value"] += data[start:end]

        def on_header_end():
            if part["field"].lower() == b"content-disposition":
                part["disposition"] = part["value"]
            part["field"], part["value"] = b"", b""

        def on_headers_finished():
            _, p = parse_options_header(part["disposition"])
            part["name"] = p.get(b"name", b"").decode()

        def on_part_data(data, start, end):
            if part["name"] == "image":
                sink.feed(data[start:end])
            else:
                fields[part["name"]] = fields.get(part["name"], b"") + data[start:end]

        parser = MultipartParser(params[b"boundary"], {
            "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            image = await anyio.to_thread.run_sync(sink.finish)
        except ValueError as exc:
            sink.close()
            return JSONResponse({"detail": str(exc)}, status_code=415)
        vitals = parse_vitals(json.loads(fields.get("vitals", b"{}") or b"{}"), strict=True)
        result = (await anyio.to_thread.run_sync(lambda: model.predict([image], [vitals])))[0]
        return {"p_covid19": float(result["p_covid19"]), "decision": result["decision"]}

    return app
