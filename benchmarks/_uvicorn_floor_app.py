"""The uvicorn floor for ``api_latency.py --uvicorn-floor``: a bare ASGI app on the same uvicorn as the
API that receives the same multipart upload into one preallocated buffer and answers ``200`` at once, with the
number of bytes it received (so a test can check that it waited for the whole body).
No FastAPI, no multipart parsing, no copies beyond uvicorn's own: the least any application served by
uvicorn (the project's server) can spend on the upload. Between the wire floor (a plain socket) and the
transport floor (FastAPI + multipart) it says how much of the transport is the server itself."""
from __future__ import annotations


def build():
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        length = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        body, have = bytearray(length), 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            body[have:have + len(chunk)] = chunk
            have += len(chunk)
            more = message.get("more_body", False)
        answer = str(have).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app
