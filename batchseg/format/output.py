"""The output folder's layout and rules, which keep every row there exactly once (no torch, no Ray).

Under ``--output``::

    part-000000.parquet ...   one object per shard, written whole (a reader never sees half a shard);
                              past part-999999, part-g1000000 ...: names sort in shard order
    _done/part-000000.json    the shard's completion record, written after its Parquet object: its rows,
                              counts, the object's size in bytes and MD5, which a rerun checks the object
                              against, the fingerprint of its manifest rows, which a rerun checks the
                              manifest against (a grown manifest reruns only the shards whose rows changed),
                              and the fingerprint of the settings it was made with (:func:`settings_of`),
                              which a rerun and ``verify`` check against the job file
    _batchseg_job.json        the settings the output was made with; a rerun must match them
    _batchseg_lease.json      while a job runs: which job holds the output (:mod:`batchseg.format.lease`)
    _summary.json             totals over all shards, written when a run ends (earlier batchseg wrote
                              ``summary.json``: read where there is no other, removed as this is written)

Every name but the shards' starts with ``_`` (a temporary with ``.``), so that directory readers (pyarrow,
pandas, Spark, DuckDB's ``*.parquet``) read the folder itself as the shards' data set.
batchseg owns exactly these names (and the ``.<name>.tmp-<32 hex>`` files a local write renames into them,
:func:`atomic.aside`; a rerun removes those an earlier run left): it reads, counts and removes nothing
else, so an output folder may also hold other files. They are made
and recognised only here (:func:`shard_object`, :func:`shard_record`, :func:`shard_index`,
:func:`is_ours`), and a completion record is written and read only as a :class:`ShardRecord`.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchseg.errors import BatchsegError, job_errors
from batchseg.format.records import error_kind
from batchseg.io import atomic, retries, storage
from batchseg.io.manifest import Shard, absolute_uri

log = logging.getLogger(__name__)

# The names batchseg writes, and the one rule that tells them from other files.
JOB_FILE = "_batchseg_job.json"
LEASE_FILE = "_batchseg_lease.json"
SUMMARY_FILE = "_summary.json"
OLD_SUMMARY_FILE = "summary.json"  # older batchseg's name, which pandas and Spark took for data
DONE_DIR = "_done"
SHARD_NAMES = "part-NNNNNN.parquet"  # how messages show the shard objects' names
_SHARD = re.compile(rf"(?:{DONE_DIR}/)?part-[g-z]?(\d+)\.(?:parquet|json)")  # a candidate: see shard_index
_SIX_DIGITS = 10**6


def shard_name(index: int) -> str:
    """``part-000042``: shard ``index`` as messages name it; its object and record are named after it.

    Names sort as their indices do, so that a listing is in manifest order: six digits up to 999,999,
    then a letter that counts the digits after it (``part-g1000000``: g for seven digits; ``part-h12345678``),
    letters sorting after digits."""
    if index < _SIX_DIGITS:
        return f"part-{index:06d}"
    digits = str(index)
    return f"part-{chr(ord('a') + len(digits) - 1)}{digits}"


def shard_object(index: int) -> str:
    """``part-000042.parquet``: shard ``index``'s rows, at the top of the output."""
    return f"{shard_name(index)}.parquet"


def shard_record(index: int) -> str:
    """``_done/part-000042.json``: shard ``index``'s completion record, relative to the output."""
    return f"{DONE_DIR}/{shard_name(index)}.json"


def shard_index(path: str) -> int | None:
    """The shard whose object or record ``path`` (relative to the output) is, named exactly as
    :func:`shard_object` and :func:`shard_record` name them (not ``part-1.parquet``), else None."""
    match = _SHARD.fullmatch(path)
    if match is None:
        return None
    index = int(match[1])
    return index if path in (shard_object(index), shard_record(index)) else None


def is_ours(path: str) -> bool:
    """Whether batchseg writes the file at ``path`` (relative to the output): a shard's object or record,
    the job, lease or summary file, or one of these being written (lying aside: :func:`atomic.aside`)."""
    path = atomic.destination(path) or path
    return path in (JOB_FILE, LEASE_FILE, SUMMARY_FILE, OLD_SUMMARY_FILE) or shard_index(path) is not None


# Settings that change what a row holds: a rerun with other values would mix two kinds of result. The
# manifest may change (grow): each shard's record says which rows it holds. The device kind (cpu, cuda) is
# decided once the job runs, and recorded then (:meth:`OutputDir.add_settings`).
COMPATIBLE_KEYS = ("model", "weights", "score_threshold", "mask_threshold", "min_size", "max_size",
                   "max_instances", "max_pixels", "shard_size", "keep_columns", "precision", "decode",
                   "device", "tile", "tile_overlap")  # fmt: skip
# What a key that an older batchseg did not write meant. Where it has no meaning here (older batchseg did
# not record its precision, decode and device), the earlier value is unknown and any is taken.
ABSENT: dict[str, Any] = {"keep_columns": {}, "tile": None, "tile_overlap": None}


def settings_of(job: dict[str, Any]) -> str:
    """The fingerprint of the settings that change what a row holds (:data:`COMPATIBLE_KEYS`) in ``job``
    (the job file, or the provenance it is written from), which each shard's record carries: a shard made
    by a job of other settings (one that was writing the output when it was started over) is told apart.
    The device is left out: it is recorded only once the job runs, after the first records may be made,
    and a run on another device kind is refused by the job file."""
    settings = {k: job.get(k, ABSENT.get(k)) for k in COMPATIBLE_KEYS if k != "device"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """A shard's completion record (``_done/part-NNNNNN.json``), written after its object: the shard is
    done, holds these rows, is ``bytes`` long with this ``md5`` (a rerun checks the object against them),
    was made from the manifest rows of this ``fingerprint`` (a rerun redoes it when they change) and with
    the ``settings`` of this fingerprint (:func:`settings_of`; a rerun redoes it when the job file's differ).

    Records of older batchseg lack ``storage_retries`` (0), ``fingerprint`` (so the shard is redone),
    ``bytes`` (the object is trusted at any size), ``settings`` (taken to be the job file's: the job file
    refused other settings, but only a lease keeps a second job out) and ``md5`` (the content is checked
    by size alone). The fields are in the order the JSON holds them: :meth:`to_json` writes what batchseg
    always wrote, byte for byte, then the newer ones."""

    rows: int
    ok: int
    errors: dict[str, int]  # error rows by kind (``read_error``...), in the order first met
    instances: int
    seconds: float  # processing the shard, its writes excluded
    attempt: int  # 1 for the first
    storage_retries: int = 0  # storage calls tried again (not those of the writes that follow)
    shard: int
    fingerprint: str | None = None
    bytes: int | None = None
    settings: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        valid = {
            "rows": _count(self.rows),
            "ok": _count(self.ok),
            "errors": isinstance(self.errors, dict)
            and all(isinstance(k, str) and _count(n) for k, n in self.errors.items()),
            "instances": _count(self.instances),
            "seconds": isinstance(self.seconds, int | float) and not isinstance(self.seconds, bool),
            "attempt": _count(self.attempt),
            "storage_retries": _count(self.storage_retries),
            "shard": _count(self.shard),
            "fingerprint": self.fingerprint is None or isinstance(self.fingerprint, str),
            "bytes": self.bytes is None or _count(self.bytes),
            "settings": self.settings is None or isinstance(self.settings, str),
            "md5": self.md5 is None or isinstance(self.md5, str),
        }
        wrong = [name for name, ok in valid.items() if not ok]
        if wrong:
            raise TypeError(f"a shard record's {', '.join(wrong)} of the wrong type")

    @classmethod
    def of(
        cls,
        shard: Shard,
        rows: list[dict[str, Any]],
        *,
        attempt: int,
        seconds: float,
        storage_retries: int,
        settings: str | None = None,
    ) -> ShardRecord:
        """The record of ``shard``, whose rows (:mod:`batchseg.format.records`) are ``rows``, made with the
        job's ``settings`` (:func:`settings_of`), but for the size and MD5 of its object, which
        :meth:`OutputDir.write_shard` fills in."""
        errors = Counter(error_kind(r["error"]) for r in rows if r["status"] == "error")
        return cls(
            rows=len(rows),
            ok=len(rows) - sum(errors.values()),
            errors=dict(errors),
            instances=sum(len(r["instances"]) for r in rows if r["instances"]),
            seconds=round(seconds, 3),
            attempt=attempt,
            storage_retries=storage_retries,
            shard=shard.index,
            fingerprint=shard.fingerprint,
            settings=settings,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | builtins.bytes) -> ShardRecord:  # (``bytes`` is a field here)
        """The record that ``text`` holds; raises ValueError (not JSON), KeyError (a field missing, but for
        those older records lack) or TypeError (not an object, or a field of another type). Fields it does
        not know are left out."""
        record = json.loads(text)
        if not isinstance(record, dict):
            raise TypeError(f"a shard record is a JSON object, not {type(record).__name__}")
        return cls(
            **{
                f.name: record[f.name]
                for f in dataclasses.fields(cls)
                if f.name in record or f.default is dataclasses.MISSING
            }
        )


@dataclass(frozen=True, order=True)
class ShardObject:
    """One shard's Parquet object as listed: its index, full path, size in bytes, and where the store
    gives them, its ETag (an object store's: the MD5 of an object PUT whole, unencrypted or SSE-S3) and
    modification time (Unix seconds)."""

    index: int
    path: str
    size: int
    etag: str | None = None
    modified: float | None = None

    def content_known(self, md5: str) -> bool:
        """Whether the store's own checksum says the object's bytes are those of ``md5`` (no read)."""
        return self.etag is not None and self.etag.strip('"') == md5


@dataclass
class Check:
    """An output's shard objects and completion records, checked against each other."""

    objects: dict[int, ShardObject]
    done: dict[int, ShardRecord] = field(default_factory=dict)  # records that hold
    broken: dict[int, str] = field(default_factory=dict)  # shard -> what is wrong with its record

    @property
    def unrecorded(self) -> list[int]:
        """Shard objects with no completion record (an unfinished shard, or put there by hand)."""
        return sorted(self.objects.keys() - self.done.keys() - self.broken.keys())


@dataclass(frozen=True)
class Resume:
    """What a rerun found, against the manifest's shards now: ``kept`` shards are done and hold the rows
    they should; ``redone`` ones were finished before but must run again (their manifest rows changed, or
    their record no longer holds); ``removed`` ones lay past the manifest's end. The rest are ``new``."""

    shards: int
    kept: frozenset[int]
    redone: tuple[int, ...]
    removed: tuple[int, ...]

    @property
    def new(self) -> int:
        return self.shards - len(self.kept) - len(self.redone)

    def line(self) -> str:
        """``3 kept, 1 redone, 2 new`` (and ``, 1 removed`` past the manifest's end)."""
        gone = f", {len(self.removed)} removed past the manifest's end" if self.removed else ""
        return f"{len(self.kept)} kept, {len(self.redone)} redone, {self.new} new{gone}"


class OutputDir:
    """The output prefix on any fsspec filesystem, and the rules that keep every row there exactly once."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = absolute_uri(uri)
        self.fs, self.path = storage.filesystem(self.uri, storage_options)

    def _at(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def read_job(self) -> dict[str, Any] | None:
        try:
            return json.loads(
                retries.retrying(lambda: self.fs.cat_file(self._at(JOB_FILE)), "reading the job file")
            )
        except FileNotFoundError:
            return None

    def prepare(self, provenance: dict[str, Any], overwrite: bool) -> None:
        """Check that this output may take the job (or clear it, with ``overwrite``), then record the job.
        Files batchseg did not write are left alone, with a warning that names them."""
        with job_errors(f"cannot use output {self.uri}"):
            self.refuse_missing_bucket()
            previous = self.read_job()
            if previous is not None and not overwrite:
                _refuse_other_settings(self.uri, previous, provenance)
                # settings decided once the job runs (the device) stay recorded until it decides them again
                provenance = provenance | {
                    k: previous[k] for k in COMPATIBLE_KEYS if k in previous and k not in provenance
                }
            files = self._files()  # one listing for the checks and removals below
            others = self.foreign(files)
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                log.warning(
                    f"output {self.uri} also holds {len(others)} file(s) batchseg did not write ({shown}); "
                    "they are left alone and never read"
                )
            if overwrite:
                self.clear(files)
            else:
                self.remove_unfinished_writes(files)
            atomic.write(self.fs, self._at(JOB_FILE), json.dumps(provenance, indent=2).encode())

    def refuse_missing_bucket(self) -> None:
        """Raise FileNotFoundError where the output's bucket does not exist: some stores (SeaweedFS) create
        a missing bucket on the first write, so it is checked before any."""
        bucket = self.path.split("/", 1)[0]
        if not storage.is_local(self.fs) and not retries.retrying(lambda: self.fs.exists(bucket), "checking"):
            raise FileNotFoundError(bucket)

    def add_settings(self, settings: dict[str, Any]) -> None:
        """Record settings decided once the job runs (the device kind, from the cluster) in the job file
        :meth:`prepare` wrote, before any shard is written; refused as there when an earlier run of this
        output recorded other values."""
        with job_errors(f"cannot use output {self.uri}"):
            job = self.read_job() or {}
            _refuse_other_settings(self.uri, job, settings)
            if any(job.get(k) != v for k, v in settings.items()):
                atomic.write(self.fs, self._at(JOB_FILE), json.dumps(job | settings, indent=2).encode())

    def _names(self, *folder: str) -> dict[str, int]:
        """Name -> size of every file directly in the output (or its ``folder``); {} when it does not exist."""
        return storage.listing(self.fs, self._at(*folder))

    def shard_objects(self) -> list[ShardObject]:
        """Every ``part-NNNNNN.parquet`` here, in shard order (one listing, with sizes, ETags and times)."""
        found = [(shard_index(name), name, e) for name, e in storage.entries(self.fs, self.path).items()]
        return sorted(
            ShardObject(i, self._at(name), int(e.get("size") or 0), e.get("ETag"), storage.modified(e))
            for i, name, e in found
            if i is not None
        )

    def _files(self) -> list[str]:
        """Every file directly in the output or in its ``_done/``, relative to the output."""
        return [*self._names(), *(f"{DONE_DIR}/{n}" for n in self._names(DONE_DIR))]

    def foreign(self, files: list[str] | None = None) -> list[str]:
        """The files here (or in a listing of them, ``files``) that batchseg did not write (it never reads,
        counts or removes them)."""
        return sorted(n for n in (self._files() if files is None else files) if not is_ours(n))

    def clear(self, files: list[str] | None = None) -> None:
        """Remove what batchseg wrote here (shards, records, job and summary files; ``files``: a listing of
        the output), nothing else; the lease stays, held by the job that clears."""
        files = self._files() if files is None else files
        ours = [self._at(n) for n in files if is_ours(n) and n != LEASE_FILE]  # the job's own
        if ours:
            retries.retrying(lambda: self.fs.rm(ours), f"removing batchseg's files from {self.uri}")
        if (
            storage.is_local(self.fs)
            and self.fs.isdir(self._at(DONE_DIR))
            and not self.fs.ls(self._at(DONE_DIR))
        ):
            self.fs.rmdir(self._at(DONE_DIR))

    def remove_unfinished_writes(self, files: list[str] | None = None) -> None:
        """Remove the files an earlier run left aside, unfinished (:func:`atomic.aside`: a crash, a full
        disk, a lease's probe), bound for batchseg's own names; nothing else. ``files``: a listing of the
        output."""
        files = self._files() if files is None else files
        unfinished = [self._at(n) for n in files if atomic.destination(n) and is_ours(n)]
        if unfinished:
            log.info(f"removing {len(unfinished)} unfinished write(s) an earlier run left in {self.uri}")
            retries.retrying(lambda: self.fs.rm(unfinished), f"removing unfinished writes from {self.uri}")

    def read_summary(self) -> dict[str, Any] | None:
        """The summary of the run that wrote the output last (:data:`SUMMARY_FILE`, else older batchseg's
        :data:`OLD_SUMMARY_FILE`); None where there is neither."""
        for name in (SUMMARY_FILE, OLD_SUMMARY_FILE):
            path = self._at(name)
            with job_errors(f"cannot read {path}"):
                try:
                    summary = json.loads(
                        retries.retrying(functools.partial(self.fs.cat_file, path), f"reading {path}")
                    )
                except (FileNotFoundError, NotADirectoryError):  # the latter: the output is a file
                    continue
            if not isinstance(summary, dict):
                raise BatchsegError(f"{path} is not a batchseg summary: it holds a {type(summary).__name__}")
            return summary
        return None

    def records(self) -> list[ShardRecord]:
        """Every shard's completion record that reads as one (one bulk read; object stores fetch them
        concurrently)."""
        return [r for r in self._read_records()[0].values() if isinstance(r, ShardRecord)]

    def _read_records(self) -> tuple[dict[int, ShardRecord | str], dict[int, float | None]]:
        """Shard index -> its completion record, or why it is not one (unreadable, another shard's); and
        shard index -> when its record was written, where the store says."""
        listed = storage.entries(self.fs, self._at(DONE_DIR))
        names = [f"{DONE_DIR}/{n}" for n in listed]
        written = {shard_index(f"{DONE_DIR}/{n}"): storage.modified(e) for n, e in listed.items()}
        indices = {self._at(n): shard_index(n) for n in names}
        paths = [path for path, index in indices.items() if index is not None]
        contents = storage.read_many(self.fs, paths, "reading shard records")
        records: dict[int, ShardRecord | str] = {}
        for path in sorted(contents):
            index = indices[path]
            assert index is not None
            try:
                record = ShardRecord.from_json(contents[path])
            except (ValueError, TypeError, KeyError) as e:
                records[index] = f"its completion record is unreadable ({type(e).__name__})"
                continue
            ok = record.shard == index and record.rows >= 0
            records[index] = record if ok else "its completion record is another shard's"
        return records, {i: t for i, t in written.items() if i is not None}

    def check(self) -> Check:
        """Every completion record against the shard object it stands for (one listing with sizes): the
        object is there, of the size the record says, and, where it was changed after its record was
        written (a record is written after its object), of the MD5 the record says (read to know)."""
        # records before objects: each object is written before its record
        records, written = self._read_records()
        objects = {o.index: o for o in self.shard_objects()}
        check = Check(objects)
        for index, record in records.items():
            problem = record if isinstance(record, str) else _object_problem(record, objects.get(index))
            if problem is None and isinstance(record, ShardRecord):
                problem = self._changed_since(record, objects[index], written.get(index))
            if problem is not None:
                check.broken[index] = problem
            elif isinstance(record, ShardRecord):
                check.done[index] = record
        return check

    def _changed_since(self, record: ShardRecord, found: ShardObject, written: float | None) -> str | None:
        """Why ``found`` no longer holds what ``record`` says, where it was changed after the record was
        written (the store's checksum, else the bytes read, against the record's MD5), else None."""
        if record.md5 is None or found.content_known(record.md5):
            return None
        if found.modified is None or written is None or found.modified <= written:
            return (
                None  # untouched since its record: reading every object on each rerun would cost the output
            )
        data = retries.retrying(lambda: self.fs.cat_file(found.path), f"reading {found.path}")
        return content_problem(record, data)

    def resume(self, fingerprints: Sequence[str], settings: str | None = None) -> Resume:
        """Which shards a rerun keeps, given the fingerprint of each of the manifest's shards now
        (:attr:`~batchseg.io.manifest.Plan.shard_fingerprints`) and of the job's ``settings``
        (:func:`settings_of`): those whose completion record holds (the object is there, of the size the
        record says, of its MD5 if changed since) and names the same rows and settings (a record without
        settings, an older batchseg's, is taken to have the job file's). Every other shard that
        was there is forgotten, its record removed before its object, so that no reader, now or after a
        crash, sees rows the manifest no longer puts there beside the ones the run writes: shards whose
        record does not hold (with a warning), whose rows changed, those past the manifest's end, and
        objects without a record (an unfinished shard's, redone anyway)."""
        check = self.check()
        changed = [
            i for i, r in check.done.items() if i < len(fingerprints) and r.fingerprint != fingerprints[i]
        ]
        other = [
            i
            for i, r in check.done.items()
            if settings is not None and r.settings is not None and r.settings != settings
        ]
        for index, problem in check.broken.items():
            log.warning(f"{shard_name(index)}: {problem}; its record is removed and the shard redone")
        if changed:
            log.info(f"{len(changed)} finished shard(s) hold manifest rows that changed; they are redone")
        if other:
            log.warning(
                f"{len(other)} finished shard(s) were made with other settings than {JOB_FILE} records "
                f"(another job wrote this output: {shard_name(other[0])} ...); they are redone"
            )
        changed = sorted({*changed, *other})
        known = check.objects.keys() | check.done.keys() | check.broken.keys()
        past = sorted(i for i in known if i >= len(fingerprints))
        self._forget(check, {*check.broken, *changed, *past, *check.unrecorded})
        kept = frozenset(i for i in check.done if i < len(fingerprints)) - set(changed)
        redone = tuple(sorted({*changed, *(i for i in check.broken if i < len(fingerprints))}))
        return Resume(len(fingerprints), kept, redone, tuple(past))

    def _forget(self, check: Check, indices: set[int]) -> None:
        """Remove these shards' records, then their objects (a crash between leaves objects without
        records, which a rerun redoes or, past the manifest's end, removes)."""
        records = [
            self._at(shard_record(i)) for i in sorted(indices & (check.done.keys() | check.broken.keys()))
        ]
        objects = [check.objects[i].path for i in sorted(indices & check.objects.keys())]
        for paths in (records, objects):
            if paths:
                retries.retrying(functools.partial(self.fs.rm, paths), f"removing {len(paths)} shard file(s)")

    def write_shard(self, shard: Shard, parquet: bytes, record: ShardRecord) -> ShardRecord:
        """The shard's rows first, then its completion record (:meth:`ShardRecord.of` the same shard): a
        record always means a whole shard, of the size it says, of the manifest rows its fingerprint names.
        Returns the record as written."""
        if (record.shard, record.fingerprint) != (shard.index, shard.fingerprint):
            raise ValueError(f"the record of shard {record.shard} given for shard {shard.index}")
        atomic.write(self.fs, self._at(shard_object(shard.index)), parquet)
        record = dataclasses.replace(record, bytes=len(parquet), md5=_md5(parquet))
        atomic.write(self.fs, self._at(shard_record(shard.index)), record.to_json().encode())
        return record

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the run's totals (:data:`SUMMARY_FILE`), and remove older batchseg's summary, which would
        otherwise be read as this output's where the new one is gone. A failure is job-level (a full disk):
        one line, the finished shards kept."""
        with job_errors(f"cannot write the summary to {self.uri}"):
            atomic.write(self.fs, self._at(SUMMARY_FILE), json.dumps(summary, indent=2).encode())
            old = self._at(OLD_SUMMARY_FILE)
            if retries.retrying(lambda: self.fs.exists(old), f"checking {old}"):
                retries.retrying(lambda: self.fs.rm(old), f"removing {old}")


def owned_by(output: str, target: str) -> bool:
    """Whether writing ``target`` would replace one of batchseg's own files in the output at ``output``
    (a report or a COCO file written over a shard or ``_summary.json``), a local one through its links
    (a local write goes where they lead: :mod:`batchseg.io.atomic`)."""

    def resolved(uri: str) -> str:
        return absolute_uri(uri) if "://" in uri else os.path.realpath(uri)

    out = resolved(output).rstrip("/") + "/"
    target = resolved(target).rstrip("/")
    return target.startswith(out) and is_ours(target.removeprefix(out))


def _object_problem(record: ShardRecord, found: ShardObject | None) -> str | None:
    name = shard_object(record.shard)
    if found is None:
        return f"its completion record is there but {name} is missing"
    if record.bytes is not None and record.bytes != found.size:
        return f"{name} is {found.size:,} bytes, its completion record says {record.bytes:,}"
    return None


def _md5(data: bytes) -> str:
    """The MD5 of ``data`` in hex: what S3 gives as the ETag of an object PUT whole (no security here)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def content_problem(record: ShardRecord, data: bytes) -> str | None:
    """Why the shard object's bytes ``data`` are not those ``record`` names by MD5, else None."""
    if record.md5 is None or _md5(data) == record.md5:
        return None
    return f"{shard_object(record.shard)} is not what its completion record says (its MD5 differs): it was changed"


def _refuse_other_settings(uri: str, previous: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse ``settings`` (those of :data:`COMPATIBLE_KEYS` given) where the job file ``previous`` records
    other values."""
    changed = [
        f"{k}: {previous.get(k, ABSENT.get(k))!r} -> {settings[k]!r}"
        for k in COMPATIBLE_KEYS
        if k in settings and (k in previous or k in ABSENT) and previous.get(k, ABSENT.get(k)) != settings[k]
    ]
    if changed:
        raise BatchsegError(
            f"output {uri} was made with other settings ({'; '.join(changed)}); "
            "rerun with --overwrite to start it over, or choose another --output"
        )
