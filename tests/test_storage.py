"""Storage: every filesystem gets timeouts, no read waits forever, throttling is transient, and files that
are not regular files are refused before they are opened."""

from __future__ import annotations

import os
import pathlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import s3fs
from botocore.exceptions import ClientError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from batchseg.errors import CredentialsRejected, ImageError, StorageUnavailable
from batchseg.io import reader, retries, storage
from tests.faults import FaultProxy
from tests.s3server import S3Server

QUICK = {"connect_timeout": 1, "read_timeout": 1}


def put(s3: S3Server, path: str) -> None:
    s3fs.S3FileSystem(skip_instance_cache=True, **s3.options()).pipe_file(path, b"bytes")


def test_timeouts_reach_each_filesystem_and_its_own_settings_win(tmp_path: pathlib.Path) -> None:
    s3 = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"}
    fs, _ = storage.filesystem("s3://bucket/key", s3)
    assert (fs.config_kwargs["connect_timeout"], fs.config_kwargs["read_timeout"]) == (10, 30)
    fs, _ = storage.filesystem(
        "s3://bucket/key", s3 | {"read_timeout": 5, "config_kwargs": {"connect_timeout": 2}}
    )
    assert (fs.config_kwargs["connect_timeout"], fs.config_kwargs["read_timeout"]) == (2, 5)
    fs, _ = storage.filesystem("https://example.com/a.jpg", {"read_timeout": 5})
    timeout = fs.client_kwargs["timeout"]
    assert (timeout.total, timeout.sock_connect, timeout.sock_read) == (None, 10, 5)
    fs, _ = storage.filesystem(str(tmp_path), QUICK)
    assert storage.is_local(fs) and "read_timeout" not in fs.storage_options


def unavailable_within(uri: str, options: dict[str, object], seconds: float) -> StorageUnavailable:
    """The StorageUnavailable an ImageReader gives for ``uri``, which must come within ``seconds``."""
    start = time.monotonic()
    future = reader.ImageReader(options, in_flight=2).fetch(uri)
    with pytest.raises(StorageUnavailable) as raised:
        future.result(timeout=seconds)  # a read that hangs fails here, it does not hang the suite
    assert time.monotonic() - start < seconds
    return raised.value


def test_a_server_that_accepts_and_never_answers_is_storage_unavailable_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's own default gives a silent server 5 minutes per try."""
    monkeypatch.setattr(retries, "RETRY_SECONDS", 2.0)
    with socket.socket() as server:  # the kernel accepts the connections; nobody ever answers them
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}/image.jpg"
        error = unavailable_within(uri, QUICK, 30)
    assert "storage kept failing" in str(error) and "Timeout" in str(error)


def test_an_s3_endpoint_that_stalls_is_storage_unavailable_soon(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs alone waits 15 s a try, five tries of botocore's five: six minutes before batchseg hears."""
    monkeypatch.setattr(retries, "RETRY_SECONDS", 2.0)
    put(s3, "data/stall/image.jpg")
    with FaultProxy(s3.ports[3], every=1, kinds=("stall",)) as proxy:
        unavailable_within(
            "s3://data/stall/image.jpg", s3.options() | {"endpoint_url": proxy.endpoint} | QUICK, 30
        )
        assert proxy.counts()["stall"] >= 1


def test_a_store_that_keeps_throttling_is_storage_unavailable_not_an_image_error(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs turns a 503 SlowDown into OSError(EBUSY, "Please reduce your request rate."), and a HEAD's
    into "Service Unavailable": transient all the same, by their cause."""
    monkeypatch.setattr(retries, "RETRY_SECONDS", 1.0)
    put(s3, "data/throttled/image.jpg")
    with FaultProxy(s3.ports[3], every=1, kinds=("slowdown",)) as proxy:
        options = s3.options() | {
            "endpoint_url": proxy.endpoint,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        error = unavailable_within("s3://data/throttled/image.jpg", options, 60)
        assert "reduce your request rate" in str(error)
        fs, path = storage.filesystem("s3://data/throttled/image.jpg", options)
        with pytest.raises(OSError) as head:
            fs.info(path)
        assert retries.is_transient(head.value), head.value
        assert proxy.counts()["slowdown"] >= 2


def test_fifos_sockets_and_devices_are_read_errors_found_without_opening_them(tmp_path: pathlib.Path) -> None:
    fifo, sock = tmp_path / "pipe.jpg", tmp_path / "sock.png"
    os.mkfifo(fifo)  # opening it waits for a writer, forever
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    kinds = {str(fifo): "a FIFO", str(sock): "a socket", "/dev/null": "a character device"}
    pool = ThreadPoolExecutor(len(kinds))
    reads = {uri: pool.submit(reader.read_image_bytes, uri) for uri in kinds}
    try:
        for uri, kind in kinds.items():
            with pytest.raises(ImageError) as raised:
                reads[uri].result(timeout=10)
            assert (raised.value.kind, raised.value.message) == (
                "read_error",
                f"{uri} is {kind}, not an image file",
            )
    finally:
        if reads[str(fifo)].running():  # a reader stuck in open(): give it a writer, so the test ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pool.shutdown()
        listener.close()


class RefusingFileSystem(MemoryFileSystem):
    """Answers every read with what s3fs makes of the store's error ``code`` (the class its table gives it,
    botocore's ClientError kept as the cause)."""

    protocol = "refusing"
    code = "AccessDenied"

    def cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
        error = ClientError(
            {"Error": {"Code": self.code, "Message": f"{self.code} says the store"}}, "GetObject"
        )
        raise translate_boto_error(error)


@pytest.mark.parametrize(
    "code", ["ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidAccessKeyId", "AccessDenied"]
)
def test_credentials_the_store_refuses_are_no_images_fault(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """An expired or revoked token fails the read as storage does (the shard is retried), whatever class s3fs
    gives it (PermissionError for ExpiredToken, OSError for InvalidToken); a plain AccessDenied is the
    image's own ``permission_denied``. The real store's refusals: tests/test_s3.py."""
    fsspec.register_implementation("refusing", RefusingFileSystem, clobber=True)
    monkeypatch.setattr(RefusingFileSystem, "code", code)
    for read in (reader.read_image_bytes, lambda uri: reader.ImageReader().fetch(uri).result()):
        if code == "AccessDenied":
            with pytest.raises(ImageError) as denied:
                read("refusing://bucket/a.jpg")
            assert denied.value.kind == "permission_denied"
            continue
        with pytest.raises(CredentialsRejected) as rejected:
            read("refusing://bucket/a.jpg")
        assert isinstance(rejected.value, StorageUnavailable)
        message = str(rejected.value)
        assert message.startswith("reading refusing://bucket/a.jpg: the storage refused the credentials ")
        assert f"({code}: " in message and "expired or been revoked" in message


def test_file_uris_are_percent_decoded_as_path_as_uri_encodes_them(tmp_path: pathlib.Path) -> None:
    """``Path.as_uri()`` writes a space as %20 and ü as %C3%BC (RFC 8089); a literal % is %25."""
    image = tmp_path / "a b ü 100%.jpg"
    image.write_bytes(b"\xff\xd8 the bytes")
    uri = image.as_uri()
    assert uri.endswith("/a%20b%20%C3%BC%20100%25.jpg")
    assert storage.read_bytes(uri) == reader.read_image_bytes(uri) == b"\xff\xd8 the bytes"
    assert storage.filesystem(uri)[1] == str(image)
