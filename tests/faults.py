"""An HTTP proxy on 127.0.0.1 in front of the S3 server that breaks requests on a fixed schedule, as a
flaky object store or network would: every ``every``-th request gets the next fault of ``kinds`` in turn.

Faults:
    ``reset``: half the response body, then the connection reset (RST) mid-body.
    ``slowdown``: ``503 SlowDown`` with S3's XML error body; the request never reaches the server.
    ``stall``: the request is served, its response held back until the client gives up (or ``stall``
        seconds), then the connection closed.
    ``truncate``: the headers (the whole ``Content-Length``) and half the body, then the connection closed.

A fault that needs a body (``reset``, ``truncate``) waits for the next response that has one (HEAD and
PUT answers have none), so every scheduled fault happens. ``GET /__faults__`` on the proxy answers
the counts so far (JSON: ``requests`` and one count per kind). Run as
``python -m tests.faults PORT UPSTREAM_PORT EVERY KINDS STALL_S``, or with :class:`FaultProxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import urllib.request
from collections import Counter, deque

from tests.latency import ProxyProcess

KINDS = ("reset", "slowdown", "stall", "truncate")
NEEDS_BODY = {"reset", "truncate"}


class FaultProxy(ProxyProcess):
    """``with FaultProxy(upstream_port, every=7) as proxy:`` then talk to ``proxy.endpoint``; ``every=1,
    kinds=("stall",)`` stalls every request."""

    module = "tests.faults"

    def __init__(
        self, upstream_port: int, every: int, kinds: tuple[str, ...] = KINDS, stall: float = 3600
    ) -> None:
        assert every >= 1 and kinds and set(kinds) <= set(KINDS), (every, kinds)
        super().__init__(upstream_port, every, ",".join(kinds), stall)

    def counts(self) -> dict[str, int]:
        """Requests seen and faults made so far, per kind."""
        with urllib.request.urlopen(f"{self.endpoint}/__faults__", timeout=10) as answer:
            counts: dict[str, int] = json.load(answer)
            return counts


class Message:
    """One HTTP/1.1 request or response: its head (start line and headers, as received) and body."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        lines = head.decode("latin-1").split("\r\n")
        self.start = lines[0]
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }

    def without(self, header: str) -> bytes:
        lines = self.head.split(b"\r\n")
        kept = [line for line in lines if not line.lower().startswith(header.encode() + b":")]
        return b"\r\n".join(kept)


async def read_head(reader: asyncio.StreamReader) -> Message | None:
    """The next message's head on ``reader`` (None at the end of the stream)."""
    try:
        return Message(await reader.readuntil(b"\r\n\r\n"), b"")
    except asyncio.IncompleteReadError:
        return None


async def read_body(reader: asyncio.StreamReader, message: Message) -> bytes:
    """``message``'s body: by Content-Length, chunked (kept as sent), or for a response that has neither,
    up to the end of the stream."""
    headers = message.headers
    if "chunked" in headers.get("transfer-encoding", ""):
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunks.append(size_line + await reader.readexactly(size + 2))
            if size == 0:  # no trailers from these clients and servers
                return b"".join(chunks)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if message.start.startswith("HTTP/") else b""


def slowdown(request: Message, number: int) -> bytes:
    """S3's throttling answer, as AWS sends it."""
    resource = request.start.split(" ")[1].split("?")[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        f"<Message>Please reduce your request rate.</Message><Resource>{resource}</Resource>"
        f"<RequestId>FAULT{number:08d}</RequestId></Error>"
    ).encode()
    is_head = request.start.startswith("HEAD ")
    head = (
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {0 if is_head else len(body)}\r\nx-amz-request-id: FAULT{number:08d}\r\n\r\n"
    ).encode()
    return head if is_head else head + body


class Faults:
    """The schedule and the counts, shared by every connection of the proxy."""

    def __init__(self, every: int, kinds: list[str]) -> None:
        self.every = every
        self.kinds = kinds
        self.counts: Counter[str] = Counter({k: 0 for k in kinds})
        self.requests = 0
        self.pending: deque[str] = deque()

    def on_request(self) -> int:
        self.requests += 1
        if self.requests % self.every == 0:
            self.pending.append(self.kinds[(self.requests // self.every - 1) % len(self.kinds)])
        return self.requests

    def take(self, kinds: set[str]) -> str | None:
        """The fault due now if it is one of ``kinds`` (it is counted as made)."""
        if self.pending and self.pending[0] in kinds:
            self.counts[self.pending[0]] += 1
            return self.pending.popleft()
        return None


async def _reset(writer: asyncio.StreamWriter) -> None:
    await writer.drain()
    await asyncio.sleep(0.05)  # let the kernel send what was written: the client sees half a body
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_port: int,
    faults: Faults,
    stall: float,
) -> None:
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while request := await read_head(client_reader):
            if request.headers.get("expect", "").lower() == "100-continue":  # answered here, not upstream
                client_writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await read_body(client_reader, request)
            if request.start.startswith("GET /__faults__"):
                answer = json.dumps({"requests": faults.requests, **faults.counts}).encode()
                client_writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                continue
            number = faults.on_request()
            if faults.take({"slowdown"}):
                client_writer.write(slowdown(request, number))
                await client_writer.drain()
                continue
            if upstream is None:
                upstream = await asyncio.open_connection("127.0.0.1", upstream_port)
            upstream[1].write(request.without("expect") + body)
            await upstream[1].drain()
            response = await read_head(upstream[0])
            if response is None:
                return
            if not request.start.startswith("HEAD ") and response.start.split(" ")[1] not in ("204", "304"):
                response.body = await read_body(upstream[0], response)
            if "close" in response.headers.get("connection", "").lower():
                upstream[1].close()
                upstream = None
            if faults.take({"stall"}):
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(client_reader.read(), stall)  # until the client gives up
                return
            kind = faults.take(NEEDS_BODY) if len(response.body) >= 2 else None
            client_writer.write(
                response.head + (response.body[: len(response.body) // 2] if kind else response.body)
            )
            if kind == "reset":
                await _reset(client_writer)
                return
            if kind == "truncate":
                return
            await client_writer.drain()
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if upstream is not None:
            upstream[1].close()
        client_writer.close()


async def _serve(port: int, upstream_port: int, every: int, kinds: list[str], stall: float) -> None:
    faults = Faults(every, kinds)
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, upstream_port, faults, stall), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, upstream, every, kinds, stall = sys.argv[1:6]
    asyncio.run(_serve(int(port), int(upstream), int(every), kinds.split(","), float(stall)))
