"""A TCP proxy on 127.0.0.1 that adds a fixed delay to every request, standing in for a distant object store.

Each chunk a client sends is passed on ``delay`` seconds after it arrived, in order and without holding
back the chunks behind it, so a request waits ``delay`` longer (as a GET to S3 waits on its round trip)
while many requests on many connections wait together. Replies pass straight through. It runs in its
own process (``python -m tests.latency UPSTREAM_PORT DELAY_MS``) so that it takes no time from the
process being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Self


class ProxyProcess:
    """A proxy on a free port of 127.0.0.1 in a process of its own (``python -m MODULE PORT ARGS...``),
    started and stopped by PID: ``with Proxy(...) as proxy:`` then talk to ``proxy.endpoint``."""

    module = ""

    def __init__(self, *args: object) -> None:
        self.args = [str(a) for a in args]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, str(self.port), *self.args],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"{self.module} did not start") from None
                time.sleep(0.05)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None


class LatencyProxy(ProxyProcess):
    """``with LatencyProxy(upstream_port, 0.05) as proxy:`` then talk to ``proxy.endpoint``."""

    module = "tests.latency"

    def __init__(self, upstream_port: int, delay: float) -> None:
        super().__init__(upstream_port, delay)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            arrived, chunk = await chunks.get()
            if not chunk:
                break
            if (wait := arrived + delay - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    sending = asyncio.create_task(send()) if delay > 0 else None
    try:
        while chunk := await reader.read(1 << 16):
            if sending is None:
                writer.write(chunk)
                await writer.drain()
            else:
                chunks.put_nowait((loop.time(), chunk))
    except (ConnectionError, OSError):
        pass
    finally:
        if sending is not None:
            chunks.put_nowait((loop.time(), b""))
            with contextlib.suppress(ConnectionError, OSError):
                await sending
        writer.close()


async def _serve(port: int, upstream_port: int, delay: float) -> None:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay), _pipe(server_reader, client_writer, 0.0)
        )

    server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
