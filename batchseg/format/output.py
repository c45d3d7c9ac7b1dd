"""The output folder's layout and rules, which keep every row there exactly once (no torch, no Ray).

Under ``--output``::

    part-000000.parquet ...   one object per shard, written whole (a reader never sees half a shard)
    _done/part-000000.json    the shard's completion record, written after its Parquet object
    _batchseg_job.json        the settings the output was made with; a rerun must match them
    summary.json              totals over all shards, written when a run ends
"""

from __future__ import annotations

import json
from typing import Any

from batchseg.errors import BatchsegError, job_errors
from batchseg.io import storage
from batchseg.io.manifest import absolute_uri, shard_name

JOB_FILE = "_batchseg_job.json"
SHARD_GLOB = "part-*.parquet"
DONE_DIR = "_done"
SUMMARY_FILE = "summary.json"
# Settings that change what a row holds: a rerun with other values would mix two kinds of result.
COMPATIBLE_KEYS = ("model", "weights", "score_threshold", "mask_threshold", "min_size", "max_size",
                   "max_instances", "max_pixels", "shard_size", "manifest_rows", "manifest_fingerprint")  # fmt: skip


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
                storage.retrying(lambda: self.fs.cat_file(self._at(JOB_FILE)), "reading the job file")
            )
        except FileNotFoundError:
            return None

    def prepare(self, provenance: dict[str, Any], overwrite: bool) -> None:
        """Check that this output may take the job (or clear it, with ``overwrite``), then record the job."""
        with job_errors(f"cannot use output {self.uri}"):
            bucket = self.path.split("/", 1)[0]
            if not storage.is_local(self.fs) and not storage.retrying(
                lambda: self.fs.exists(bucket), "checking"
            ):
                raise FileNotFoundError(bucket)  # some stores create a missing bucket on write: refuse first
            previous = self.read_job()
            if previous is not None and not overwrite:
                _refuse_other_settings(self.uri, previous, provenance)
            if overwrite:
                self.clear()
            storage.write_atomic(self.fs, self._at(JOB_FILE), json.dumps(provenance, indent=2).encode())

    def clear(self) -> None:
        """Remove what batchseg wrote here (shards, records, job and summary files), nothing else."""
        if not self.fs.exists(self.path):
            return
        ours = [p for p in storage.listing(self.fs, self.path) if _is_ours(p.rsplit("/", 1)[-1])]
        if self.fs.exists(self._at(DONE_DIR)):
            self.fs.rm(self._at(DONE_DIR), recursive=True)
        if ours:
            self.fs.rm(ours)

    def done_shards(self) -> frozenset[int]:
        return frozenset(int(p.rsplit("/", 1)[-1][5:-5]) for p in self._records())

    def _records(self) -> list[str]:
        try:
            names = storage.listing(self.fs, self._at(DONE_DIR))
        except FileNotFoundError:
            return []
        return [n for n in names if n.endswith(".json") and n.rsplit("/", 1)[-1].startswith("part-")]

    def records(self) -> list[dict[str, Any]]:
        """Every shard's completion record (one bulk read; object stores fetch them concurrently)."""
        paths = self._records()
        contents = storage.retrying(lambda: self.fs.cat(paths), "reading shard records") if paths else {}
        return [json.loads(contents[p]) for p in sorted(contents)]

    def write_shard(self, index: int, parquet: bytes, record: dict[str, Any]) -> None:
        """The shard's rows first, then its completion record: a record always means a whole shard."""
        storage.write_atomic(self.fs, self._at(f"{shard_name(index)}.parquet"), parquet)
        storage.write_atomic(
            self.fs, self._at(DONE_DIR, f"{shard_name(index)}.json"), json.dumps(record).encode()
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        storage.write_atomic(self.fs, self._at(SUMMARY_FILE), json.dumps(summary, indent=2).encode())


def _refuse_other_settings(uri: str, previous: dict[str, Any], provenance: dict[str, Any]) -> None:
    changed = [
        f"{k}: {previous.get(k)!r} -> {provenance.get(k)!r}"
        for k in COMPATIBLE_KEYS
        if previous.get(k) != provenance.get(k)
    ]
    if changed:
        raise BatchsegError(
            f"output {uri} was made with other settings ({'; '.join(changed)}); "
            "rerun with --overwrite to start it over, or choose another --output"
        )


def _is_ours(name: str) -> bool:
    return (name.startswith("part-") and ".parquet" in name) or name in (JOB_FILE, SUMMARY_FILE)
