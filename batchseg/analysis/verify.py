"""``batchseg verify``: prove an output whole. Every completion record against its object (size, and MD5:
from the store's ETag where it is the MD5, else from the bytes read), every record's settings against the
job file, every object's row count (from its Parquet footer) and schema, and every shard's image ids
against the manifest, so that each manifest row is there exactly once. Streams shard by shard: memory
stays one shard's object (one shard's ids where the store's ETag proves the content)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.errors import BatchsegError, job_errors
from batchseg.format.output import (
    JOB_FILE,
    OutputDir,
    ShardObject,
    ShardRecord,
    content_problem,
    settings_of,
    shard_name,
    shard_object,
)
from batchseg.format.records import NEWER_COLUMNS, SCHEMA
from batchseg.io import retries
from batchseg.io.manifest import Plan, Shard, iter_shards, plan_shards


@dataclass
class Verdict:
    """What :func:`verify` found: ``problems`` is empty when the output holds every manifest row once."""

    uri: str
    images: int = 0
    shards: int = 0
    shards_expected: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """The one-line verdict."""
        if self.ok:
            return (
                f"OK: {self.uri}: {self.images:,} images in {self.shards:,} shards, every manifest row "
                "exactly once, every shard as its record says"
            )
        return f"FAILED: {self.uri}: {len(self.problems):,} problem(s) in {self.shards:,} shards"


def verify(uri: str, manifest: str | None = None, storage_options: dict[str, Any] | None = None) -> Verdict:
    """Check the output at ``uri`` fully against its records and ``manifest`` (default: the one recorded
    in ``_batchseg_job.json``). Raises :class:`BatchsegError` only when ``uri`` cannot be read at all."""
    output = OutputDir(uri, storage_options)
    verdict = Verdict(output.uri)
    with job_errors(f"cannot read output {output.uri}"):
        job = output.read_job()
        check = output.check()
    if job is None and not check.objects and not check.done and not check.broken:
        raise BatchsegError(f"output {output.uri} holds no {JOB_FILE} and no shards: not a batchseg output")
    problems = verdict.problems
    if job is None:
        problems.append(f"{JOB_FILE} is missing: the settings the output was made with are unknown")
    problems.extend(f"{shard_name(i)}: {problem}" for i, problem in sorted(check.broken.items()))
    problems.extend(
        f"{shard_object(i)} has no completion record (an unfinished shard, or put there by hand)"
        for i in check.unrecorded
    )
    plan = _plan(job, manifest, storage_options, problems)
    expected = iter_shards(plan, frozenset(), storage_options) if plan else None
    if plan is not None:
        verdict.shards_expected = plan.num_shards
        beyond = sorted(i for i in check.objects.keys() | check.done.keys() if i >= plan.num_shards)
        problems.extend(f"{shard_name(i)}: past the manifest's last shard" for i in beyond)
    settings = settings_of(job) if job is not None else None
    missing: list[int] = []
    seen: set[str] | None = set() if plan is None else None  # no manifest: check ids are unique across shards
    for index in range(plan.num_shards) if plan else sorted(check.done):
        shard = next(expected) if expected else None
        if index not in check.done:
            missing.append(index)
            continue
        record = check.done[index]
        if plan is not None and record.fingerprint != plan.shard_fingerprints[index]:
            problems.append(
                f"{shard_name(index)}: the manifest's rows for it changed: rerun segment to redo it"
            )
            shard = (
                None  # its ids are the old rows': they are still checked for duplicates, not against these
            )
        if settings is not None and record.settings not in (None, settings):
            problems.append(
                f"{shard_name(index)}: made with other settings than {JOB_FILE} records (another job wrote "
                "this output): rerun segment to redo it"
            )
        kept = (job or {}).get("keep_columns", {})
        ids = _check_object(output, check.objects[index], record, shard, kept, problems)
        verdict.shards += 1
        verdict.images += len(ids)
        if seen is not None:
            again = seen.intersection(ids)
            problems.extend(f"{shard_name(index)}: image_id {i!r} is also in an earlier shard" for i in again)
            seen.update(ids)
    if missing:
        shown = ", ".join(shard_name(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(f"{len(missing):,} of the manifest's shards are not done ({shown}): rerun segment")
    return verdict


def _plan(
    job: dict[str, Any] | None,
    manifest: str | None,
    storage_options: dict[str, Any] | None,
    problems: list[str],
) -> Plan | None:
    """The manifest's plan with the output's shard size, or None (with a problem) when it cannot be had."""
    manifest = manifest or (job or {}).get("manifest")
    if job is None or manifest is None:
        return None
    try:
        keep = tuple(job.get("keep_columns", {}))
        plan = plan_shards(manifest, int(job["shard_size"]), storage_options, keep)
    except (BatchsegError, KeyError, TypeError, ValueError) as e:
        problems.append(f"cannot check the image ids against the manifest: {e}")
        return None
    return plan


def _check_object(
    output: OutputDir,
    found: ShardObject,
    record: ShardRecord,
    shard: Shard | None,
    kept: dict[str, str],
    problems: list[str],
) -> list[str]:
    """The shard object's image ids, after checking its content, footer, schema (with the ``kept`` manifest
    columns: name -> type) and ids against its record and ``shard`` (the manifest's rows for it, when
    known). The whole object is read to check its MD5 unless the store's ETag is that MD5."""
    name = shard_object(found.index)
    try:
        with job_errors(f"cannot read {found.path}"):
            if record.md5 is None or found.content_known(record.md5):
                source: Any = output.fs.open(found.path, "rb")
            else:
                data = retries.retrying(lambda: output.fs.cat_file(found.path), f"reading {found.path}")
                changed = content_problem(record, data)
                if changed is not None:
                    problems.append(changed)
                source = pa.BufferReader(data)
            with source:
                parquet = pq.ParquetFile(source)
                ids = parquet.read(columns=["image_id"]).column("image_id").to_pylist()
                schema = parquet.schema_arrow
    except BatchsegError as e:
        problems.append(f"{name}: {e}")
        return []
    others = {f.name: str(f.type) for f in schema if f.name not in SCHEMA.names}
    # An older batchseg's shard lacks the newer columns (NEWER_COLUMNS); it has every other one.
    expected = pa.schema(f for f in SCHEMA if f.name in schema.names or f.name not in NEWER_COLUMNS)
    if (
        not pa.schema(schema.field(n) for n in SCHEMA.names if n in schema.names).equals(expected)
        or others != kept
    ):
        problems.append(f"{name}: its columns are not batchseg's")
    if len(ids) != record.rows:
        problems.append(f"{name} holds {len(ids):,} rows, its completion record says {record.rows:,}")
    if len(set(ids)) != len(ids):
        problems.append(f"{name} holds {len(ids) - len(set(ids)):,} duplicate image_id value(s)")
    if shard is not None and ids != shard.image_ids:
        lost = len(set(shard.image_ids) - set(ids))
        extra = len(set(ids) - set(shard.image_ids))
        problems.append(
            f"{name} does not hold the manifest's rows for it: {lost:,} missing, {extra:,} not in the shard"
            + ("" if lost or extra else ", in another order")
        )
    return ids
