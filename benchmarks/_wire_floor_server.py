"""The wire floor for ``api_latency.py --wire-floor``: the least any HTTP server on this host can spend
receiving the upload. A plain blocking socket in its own process (as the API server is), one thread,
``recv_into`` a preallocated buffer: no HTTP parser beyond finding Content-Length, no multipart parsing,
no asyncio, no copies. It answers ``200`` with a two-byte body once the whole body is in.

    python benchmarks/_wire_floor_server.py PORT

What is left of an upload's cost here is the client building and sending the request, the two kernel
copies over loopback, and the round trip: a transport floor for the upload that no server-side change
can go under (short of overlapping the decode with the receive).
"""
from __future__ import annotations

import socket
import sys

_BUFFER = 64 * 2**20  # over the API's upload limit: one request always fits


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def serve(port: int) -> None:
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    with socket.create_server(("127.0.0.1", port), reuse_port=False) as server:
        while True:
            conn, _ = server.accept()
            with conn:
                _answer_requests(conn, view)


def _answer_requests(conn: socket.socket, view: memoryview) -> None:
    """Keep-alive: answer each request on the connection until the client closes it."""
    have = 0
    while True:
        end = -1
        while end < 0:
            got = conn.recv_into(view[have:], len(view) - have)
            if got == 0:
                return
            have += got
            end = bytes(view[:min(have, 8192)]).find(b"\r\n\r\n")
        need = end + 4 + _content_length(bytes(view[:end]))
        while have < need:
            got = conn.recv_into(view[have:need], need - have)
            if got == 0:
                return
            have += got
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        view[:have - need] = view[need:have]  # a pipelined next request, if any (httpx sends none)
        have -= need


if __name__ == "__main__":
    serve(int(sys.argv[1]))
