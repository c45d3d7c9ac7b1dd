"""The output's lease (``_batchseg_lease.json``): one job at a time writes an output (no torch, no Ray).

A job takes the lease before it writes anything (the job file, ``--overwrite``'s clearing), renews its
heartbeat from a thread of the driver every :data:`HEARTBEAT_S` seconds while it runs, and removes it at the
end, error or Ctrl-C included. Another job on the same output is refused in one line that names the holder;
a lease whose heartbeat stopped more than :data:`STALE_AFTER_S` seconds ago (its job was killed, its machine
lost) is taken over with a warning.

The lease is created only if absent (:func:`batchseg.io.atomic.create`: a hard link on disk, a conditional
PUT on S3) and always read back. Where two jobs may both have written it (a store without conditional
writes, where the last writer wins, or two jobs taking over one stale lease at once, where the second may
remove the first's new lease) the read-back waits :data:`SETTLE_S` first: the job that lost has learnt it
before it writes anything. A lease's age is the store's: the time of its last write against that of a
probe written now, so the clocks of the jobs' machines need not agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
# interval between them, with room to spare (its age is the store's clock: no machine's clock enters). A
# killed job holds its output up for at most these 2 minutes.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
# A job racing this one for the lease writes or removes it one storage call after its own read: well
# within 2 s, which only a takeover or a store without conditional writes waits.
SETTLE_S = 2.0
UNREADABLE = "?"  # the owner of a lease that does not read as one (written by hand, or caught half-written)


@dataclass(frozen=True)
class Holder:
    """What the lease file holds: who holds the output. Times are Unix seconds."""

    owner: str  # a random id of the run
    host: str
    pid: int
    started: float
    heartbeat: float
    pid_namespace: str = ""  # Linux: the PID namespace of ``pid`` (see Lease._ended); "" where unknown

    def line(self, age: float) -> str:
        """``host h, pid 42, started 2026-12-07 10:00:00 UTC, last heartbeat 4 s ago``, its heartbeat
        ``age`` seconds old."""
        if self.owner == UNREADABLE:
            return f"its lease does not read as batchseg's; last written {age:.0f} s ago"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}, last heartbeat {age:.0f} s ago"


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
            age = self._age() if held is not None else None
            if held is not None and age is not None:
                if age < self.stale_after_s and not self._ended(held):
                    raise self._refusal(held, age)
                why = "ended" if age < self.stale_after_s else f"stale after {self.stale_after_s:.0f} s"
                log.warning(
                    f"output {uri}: taking over the lease of a job whose heartbeat stopped ({held.line(age)}; {why})"
                )
                self._remove(held)
            else:  # none, or it went as this job looked
                held = None
            try:
                exclusive = atomic.create(self.output.fs, self.path, self._body(self.me))
            except FileExistsError:
                exclusive = True  # another job's: the read-back names it
            if held is not None or not exclusive:
                time.sleep(SETTLE_S)
            held = self._read()
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

    def _refusal(self, held: Holder | None, age: float | None = None) -> BatchsegError:
        if held is not None and age is None:
            age = self._age()
        who = held.line(age or 0.0) if held is not None else "another job"
        return BatchsegError(
            f"output {self.output.uri} is being written by another job ({who}); wait for it to end or stop "
            f"it, or choose another --output (its lease, {LEASE_FILE}, goes stale {self.stale_after_s:.0f} s "
            "after its last heartbeat)"
        )

    @staticmethod
    def _body(holder: Holder) -> bytes:
        return json.dumps(asdict(holder), indent=2).encode()

    def _read(self, retry: bool = True) -> Holder | None:
        """The lease as it is now, or None. One that does not read as a lease (written by hand, or caught
        half-written on a filesystem without hard links) is someone's. The heartbeat reads it without
        retries: it does not wait out a failing store, it tries again at its next beat."""
        fs = self.output.fs
        fs.invalidate_cache(self.path)
        try:
            text = retries.retrying(
                lambda: fs.cat_file(self.path), f"reading {self.path}", None if retry else 0
            )
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            return Holder(UNREADABLE, "?", 0, 0.0, 0.0)

    def _age(self) -> float | None:
        """Seconds since the lease was last written by the store's clock (a probe written beside it now
        against the lease's modification time), or None when there is no lease any more."""
        fs = self.output.fs
        probe = atomic.aside(self.path)
        retries.retrying(lambda: fs.pipe_file(probe, b""), f"writing {probe}")
        try:
            fs.invalidate_cache(self.path)
            now = retries.retrying(lambda: fs.modified(probe), f"reading {probe}")
            try:
                then = retries.retrying(lambda: fs.modified(self.path), f"reading {self.path}")
            except FileNotFoundError:
                return None
        finally:
            retries.retrying(lambda: fs.rm(probe), f"removing {probe}")
        return (now - then).total_seconds()

    def _remove(self, held: Holder) -> None:
        """Remove the stale lease ``held`` if it is still the one there: another job taking it over at the
        same time may have replaced it already."""
        if self._read() == held:
            with contextlib.suppress(FileNotFoundError):
                retries.retrying(lambda: self.output.fs.rm(self.path), f"removing {self.path}")

    def _beat(self) -> None:
        """Every ``heartbeat_s``: the lease's heartbeat renewed, unless another job holds it now (it took
        over a lease it found stale, or wrote over it on a store without conditional writes): then the
        lease is lost, and :meth:`check` says so. A heartbeat that fails is tried again at the next one."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read(retry=False)
                if held is None or held.owner != self.me.owner:
                    who = held.line(0) if held is not None else "nobody: it was removed"
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


def _pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), or "" where the system does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
