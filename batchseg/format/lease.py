"""The output's lease (``_batchseg_lease.json``): one job at a time writes an output (no torch, no Ray).

A job takes the lease before it writes anything (the job file, ``--overwrite``'s clearing), renews its
heartbeat from a thread of the driver every :data:`HEARTBEAT_S` seconds while it runs, and removes it at the
end, error or Ctrl-C included. Another job on the same output is refused in one line that names the holder;
a lease whose heartbeat stopped more than :data:`STALE_AFTER_S` seconds ago (its job was killed, its machine
lost) is taken over with a warning.

The lease is created only if absent: on local disk by a hard link of the whole file (atomic, fails if the
name exists), on S3 by a conditional PUT (``If-None-Match: *``: AWS S3, SeaweedFS); elsewhere fsspec's
create checks first and writes after. It is always read back: on a store that ignores the condition the
last writer wins, and the loser learns it at once (it is refused) or at its next heartbeat (its lease is
lost: the job stops with an error before it hands out another shard).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from batchseg.errors import BatchsegError, describe, job_errors
from batchseg.format.output import LEASE_FILE, OutputDir
from batchseg.io import atomic, retries, storage

log = logging.getLogger(__name__)

# A heartbeat every 10 s costs one read and one small write (S3: two requests per 10 s per job). A lease is
# stale only after 120 s without one: one heartbeat may take up to 40 s of storage timeouts
# (storage.CONNECT_TIMEOUT + READ_TIMEOUT) and fail, so 120 s is about two heartbeats lost whole plus the
# interval between them, with room for the clocks of two machines to differ by a minute (the heartbeat is
# the holder's clock, its age the taker's). A killed job holds its output up for at most these 2 minutes.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Holder:
    """What the lease file holds: who holds the output. Times are Unix seconds."""

    owner: str  # a random id of the run
    host: str
    pid: int
    started: float
    heartbeat: float
    pid_namespace: str = ""  # Linux: the PID namespace of ``pid`` (see Lease._ended); "" where unknown

    def line(self, now: float) -> str:
        """``host h, pid 42, started 2026-12-07 10:00:00 UTC, last heartbeat 4 s ago``."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}, last heartbeat {now - self.heartbeat:.0f} s ago"


class Lease:
    """This run's lease on ``output``: :meth:`take` it (refused while another job holds it), :meth:`check`
    that it still holds, :meth:`release` it. A context manager: taken on entry, released on exit."""

    def __init__(
        self, output: OutputDir, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.output = output
        self.path = storage.join(output.path, LEASE_FILE)
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, _pid_namespace())
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost: str | None = None  # why the lease no longer holds, once another job took it
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.take()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def take(self) -> None:
        """Hold the output, or raise :class:`BatchsegError` naming the job that holds it."""
        uri = self.output.uri
        with job_errors(f"cannot use output {uri}"):
            self.output.refuse_missing_bucket()
            held = self._read()
            if held is not None:
                age = time.time() - held.heartbeat
                if age < self.stale_after_s and not self._ended(held):
                    raise self._refusal(held)
                why = "ended" if age < self.stale_after_s else f"stale after {self.stale_after_s:.0f} s"
                log.warning(
                    f"output {uri}: taking over the lease of a job whose heartbeat stopped "
                    f"({held.line(time.time())}; {why})"
                )
                retries.retrying(lambda: self.output.fs.rm(self.path), f"removing {self.path}")
            self._create(self._body(self.me))
            held = self._read()  # a store that ignores the condition: the last writer wins
            if held is None or held.owner != self.me.owner:
                raise self._refusal(held)
        self._beating = threading.Thread(target=self._beat, name="batchseg-lease", daemon=True)
        self._beating.start()

    def _ended(self, held: Holder) -> bool:
        """Whether the holder's process is known to have ended: it ran on this machine, in this PID
        namespace (containers may share a host name), and no process has its PID now. A rerun right after
        ``kill -9`` or a crash of the driver then need not wait for the lease to go stale."""
        if (held.host, held.pid_namespace) != (self.me.host, self.me.pid_namespace) or held.pid <= 0:
            return False
        try:
            os.kill(held.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # there, another user's
            return False
        return False

    def check(self) -> None:
        """Raise :class:`BatchsegError` once another job has taken the lease (see :meth:`_beat`)."""
        if self.lost is not None:
            raise BatchsegError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's. Never raises: it runs on the
        way out of a failed job, whose error is what the user must see; a lease left behind goes stale."""
        self._stop.set()
        if self._beating is None:
            return
        self._beating.join()
        self._beating = None
        try:
            held = self._read()
            if held is not None and held.owner == self.me.owner:
                retries.retrying(lambda: self.output.fs.rm(self.path), f"removing {self.path}", seconds=10)
        except Exception as e:
            log.warning(
                f"output {self.output.uri}: cannot remove its lease ({describe(e)}); a later run takes it "
                f"over {self.stale_after_s:.0f} s after this one's last heartbeat"
            )

    def _refusal(self, held: Holder | None) -> BatchsegError:
        who = held.line(time.time()) if held is not None else "another job"
        return BatchsegError(
            f"output {self.output.uri} is being written by another job ({who}); wait for it to end or stop "
            f"it, or choose another --output (its lease, {LEASE_FILE}, goes stale {self.stale_after_s:.0f} s "
            "after its last heartbeat)"
        )

    @staticmethod
    def _body(holder: Holder) -> bytes:
        return json.dumps(asdict(holder), indent=2).encode()

    def _read(self) -> Holder | None:
        """The lease as it is now, or None. One that does not read as a lease (written by hand, or caught
        half-written on a filesystem without hard links) is someone's, its heartbeat its modification time."""
        fs = self.output.fs
        fs.invalidate_cache(self.path)
        try:
            text = retries.retrying(lambda: fs.cat_file(self.path), f"reading {self.path}")
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            modified = retries.retrying(lambda: fs.modified(self.path), f"reading {self.path}").timestamp()
            return Holder("?", "?", 0, modified, modified)

    def _create(self, data: bytes) -> None:
        """Write the lease only if none is there; whether it was is for the read that follows to say."""
        fs = self.output.fs
        if not storage.is_local(fs):
            try:
                retries.retrying(lambda: fs.pipe_file(self.path, data, mode="create"), f"writing {self.path}")
            except OSError:  # exists (FileExistsError, or SeaweedFS's 412 as EINVAL), or the store failed
                if self._read() is None:
                    raise
            return
        fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        whole = atomic.aside(self.path)
        with open(whole, "wb") as f:
            f.write(data)
        try:
            os.link(whole, self.path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: an exclusive create, the file briefly empty
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.unlink(whole)

    def _beat(self) -> None:
        """Every ``heartbeat_s``: the lease's heartbeat renewed, unless another job holds it now (it took
        over a lease it found stale, or wrote over it on a store without conditional writes): then the
        lease is lost, and :meth:`check` says so. A heartbeat that fails is tried again at the next one."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read_once()
                if held is None or held.owner != self.me.owner:
                    who = held.line(time.time()) if held is not None else "nobody: it was removed"
                    self.lost = (
                        f"output {self.output.uri}: this job's lease was taken by another job ({who}); "
                        "stopped so that two jobs do not write one output"
                    )
                    log.error(self.lost)
                    return
                body = self._body(Holder(**(asdict(self.me) | {"heartbeat": time.time()})))
                if storage.is_local(self.output.fs):
                    atomic.write(self.output.fs, self.path, body)
                else:
                    self.output.fs.pipe_file(self.path, body)
            except Exception as e:
                log.warning(f"output {self.output.uri}: cannot renew its lease ({describe(e)}); trying again")

    def _read_once(self) -> Holder | None:
        """The lease as :meth:`_read` gives it, in one storage call (the heartbeat does not wait out retries)."""
        fs = self.output.fs
        fs.invalidate_cache(self.path)
        try:
            return Holder(**json.loads(fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return Holder("?", "?", 0, 0.0, 0.0)


def _pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), or "" where the system does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
