"""An HTTP proxy on 127.0.0.1 in front of the S3 server that breaks requests on a fixed schedule, as a
flaky object store or network would: every ``every``-th request (of those whose request line matches
``only``) gets the next fault of ``kinds`` in turn, and so do the next ``repeat - 1`` requests for the
same method and path (the client's retries: s3fs and botocore retry a few times on their own, so a fault
that must reach batchseg outlasts them).

Faults:
    ``reset``: the headers and half the body (half the headers if there is no body), then the
        connection reset (RST).
    ``slowdown``: ``503 SlowDown`` with S3's XML error body; the request never reaches the server.
    ``stall``: the request is served, its response held back until the client gives up (or ``stall``
        seconds), then the connection closed.
    ``truncate``: the headers (the whole ``Content-Length``) and half the body (half the headers if
        there is no body), then the connection closed.

``GET /__faults__`` on the proxy answers the counts so far (JSON: ``requests``, one count per kind, and
``faulted``: each fault started, as its kind, method and target; ``body_bytes``: the bytes of the response
bodies passed on whole, what a client read from the store).
Run as ``python -m tests.faults PORT UPSTREAM_PORT EVERY KINDS REPEAT ONLY STALL_S``, or with
:class:`FaultProxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import sys
import urllib.request
from collections import Counter
from typing import Any

from tests.latency import ProxyProcess

KINDS = ("reset", "slowdown", "stall", "truncate")


class FaultProxy(ProxyProcess):
    """``with FaultProxy(upstream_port, every=7) as proxy:`` then talk to ``proxy.endpoint``; ``every=1,
    kinds=("stall",)`` stalls every request; ``only=r"/images/"`` breaks only the requests whose request
    line matches."""

    module = "tests.faults"

    def __init__(
        self,
        upstream_port: int,
        every: int,
        kinds: tuple[str, ...] = KINDS,
        *,
        repeat: int = 1,
        only: str = "",
        stall: float = 3600,
    ) -> None:
        assert every >= 1 and repeat >= 1 and kinds and set(kinds) <= set(KINDS), (every, repeat, kinds)
        super().__init__(upstream_port, every, ",".join(kinds), repeat, only, stall)

    def counts(self) -> dict[str, Any]:
        """Requests seen and faults made so far, per kind, and the requests broken (``faulted``)."""
        with urllib.request.urlopen(f"{self.endpoint}/__faults__", timeout=10) as answer:
            counts: dict[str, Any] = json.load(answer)
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

    def __init__(self, every: int, kinds: list[str], repeat: int, only: str) -> None:
        self.every = every
        self.kinds = kinds
        self.repeat = repeat
        self.only = re.compile(only)
        self.counts: Counter[str] = Counter({k: 0 for k in kinds})
        self.requests = self.eligible = 0
        self.repeating: dict[str, tuple[str, int]] = {}  # "METHOD target": (kind, requests left)
        self.faulted: list[str] = []
        self.body_bytes = 0

    def fault_for(self, request_line: str) -> str | None:
        """The fault this request gets, if any (counted as made)."""
        self.requests += 1
        key = request_line.rsplit(" ", 1)[0]  # without the protocol version
        if (repeating := self.repeating.pop(key, None)) is not None:
            kind, left = repeating
            if left > 1:
                self.repeating[key] = (kind, left - 1)
        elif self.only.search(request_line):
            self.eligible += 1
            if self.eligible % self.every:
                return None
            kind = self.kinds[(self.eligible // self.every - 1) % len(self.kinds)]
            self.faulted.append(f"{kind} {key}")
            if self.repeat > 1:
                self.repeating[key] = (kind, self.repeat - 1)
        else:
            return None
        self.counts[kind] += 1
        return kind


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
                report = {
                    "requests": faults.requests,
                    **faults.counts,
                    "faulted": faults.faulted,
                    "body_bytes": faults.body_bytes,
                }
                answer = json.dumps(report).encode()
                client_writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                continue
            kind = faults.fault_for(request.start)
            if kind == "slowdown":
                client_writer.write(slowdown(request, faults.requests))
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
            if kind == "stall":
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(client_reader.read(), stall)  # until the client gives up
                return
            if kind is None:
                faults.body_bytes += len(response.body)
                client_writer.write(response.head + response.body)
                await client_writer.drain()
                continue
            # half the body after the headers, or half the headers when there is no body
            cut = len(response.head) + len(response.body) // 2 if response.body else len(response.head) // 2
            client_writer.write((response.head + response.body)[:cut])
            if kind == "reset":
                await _reset(client_writer)
            return
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if upstream is not None:
            upstream[1].close()
        client_writer.close()


async def _serve(
    port: int, upstream_port: int, every: int, kinds: list[str], repeat: int, only: str, stall: float
) -> None:
    faults = Faults(every, kinds, repeat, only)
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, upstream_port, faults, stall), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, upstream, every, kinds, repeat, only, stall = sys.argv[1:8]
    asyncio.run(
        _serve(int(port), int(upstream), int(every), kinds.split(","), int(repeat), only, float(stall))
    )
