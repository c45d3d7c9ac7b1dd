"""What a segmentation actor is given (the settings and the weights once, never the job's plan), its share
of a GPU, and how it takes the shards queued on it: at once, the model taking them in turn."""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.format import output as output_module
from batchseg.format.output import OutputDir, shard_object, shard_record
from batchseg.io.manifest import Shard, iter_shards
from batchseg.segment import driver as driver_module
from batchseg.segment.driver import Driver, gpu_memory_share
from batchseg.segment.job import SegmentConfig, prepare_job
from batchseg.segment.processor import ActorSetup, ShardProcessor
from tests.segmenting import assert_same_rows
from tests.test_segment import SMALL_MODEL, archive

WAIT = 60  # seconds a gate waits before the test fails instead of hanging


class Events:
    """What happened, in order, from any thread; each ``(what, shard)`` also sets an event to wait for."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.happened: dict[tuple[str, int], threading.Event] = {}
        self.in_progress_while_writing = 0

    def event(self, what: str, shard: int) -> threading.Event:
        with self.lock:
            return self.happened.setdefault((what, shard), threading.Event())

    def add(self, what: str, shard: int) -> None:
        with self.lock:
            self.seen.append((what, shard))
        self.event(what, shard).set()

    def wait(self, what: str, shard: int) -> None:
        assert self.event(what, shard).wait(WAIT), f"{what} of shard {shard} never happened"

    def index(self, what: str, shard: int) -> int:
        return self.seen.index((what, shard))


@pytest.fixture
def three_shards(tmp_path: pathlib.Path) -> tuple[SegmentConfig, list[Shard]]:
    manifest, _, _ = archive(tmp_path, 6, bad=False)
    config = SegmentConfig(
        manifest=manifest, output=str(tmp_path / "out"), shard_size=2, batch_size=1, **SMALL_MODEL
    )
    with prepare_job(config) as job:
        return config, list(iter_shards(job.plan))


def instrumented(config: SegmentConfig, shards: list[Shard], events: Events) -> ShardProcessor:
    """The job's processor, noting each shard's reads, model turn and write in ``events``. Shard 0 holds
    the model until shard 1's reads have begun; shard 0's write waits until shard 1's turn is over: so
    the test waits (and fails) where the model would take shards at once, or a write would hold it."""
    with prepare_job(config) as job:
        processor = ShardProcessor.for_job(job)
    shard_of = {uri: shard.index for shard in shards for uri in shard.uris}
    fetch, rows, write = processor.loader.reader.fetch, processor.rows, processor.output.write_shard

    def noted_fetch(uri: str) -> Any:
        events.add("read", shard_of[uri])
        return fetch(uri)

    def noted_rows(shard: Shard, images: Any = None) -> Any:
        events.add("model", shard.index)
        if shard.index == 0:
            events.wait("read", 1)
        made = rows(shard, images)
        events.add("model done", shard.index)
        return made

    def noted_write(shard: Shard, parquet: bytes, record: Any) -> Any:
        if shard.index == 0:
            events.wait("model done", 1)
            events.in_progress_while_writing = processor.images_in_progress
        written = write(shard, parquet, record)
        events.add("written", shard.index)
        return written

    processor.loader.reader.fetch = noted_fetch  # type: ignore[method-assign]
    processor.rows = noted_rows  # type: ignore[method-assign]
    processor.output.write_shard = noted_write  # type: ignore[method-assign]
    return processor


def test_shards_taken_at_once_share_the_model_in_turn_reading_early_and_writing_late(
    three_shards: tuple[SegmentConfig, list[Shard]], tmp_path: pathlib.Path
) -> None:
    """As an actor runs the two shards queued on it: the next shard's reads begin while the model is on
    the one before, the model takes one shard at a time, and a shard is written while the model is on the
    next; the rows are those of one shard after another, exactly once and in order."""
    config, shards = three_shards
    events = Events()
    processor = instrumented(config, shards, events)
    with ThreadPoolExecutor(2) as calls:
        first = calls.submit(processor.process, shards[0])
        events.wait("model", 0)
        rest = [calls.submit(processor.process, shard) for shard in shards[1:]]
        records = [call.result(timeout=WAIT) for call in (first, *rest)]
    turns = [e for e in events.seen if e[0] in ("model", "model done")]
    assert turns == [(what, i) for i in range(3) for what in ("model", "model done")]
    assert events.index("read", 1) < events.index("model done", 0)
    assert events.index("model done", 1) < events.index("written", 0)
    assert [(r.shard, r.rows) for r in records] == [(0, 2), (1, 2), (2, 2)]
    assert events.in_progress_while_writing >= 2  # shard 0's images count until its record is back
    assert processor.images_in_progress == 0

    one_by_one = replace(config, output=str(tmp_path / "one-by-one"))
    with prepare_job(one_by_one) as job:
        alone = ShardProcessor.for_job(job)
    for shard in shards:
        alone.process(shard)
    rows = open_results(config.output).to_table().to_pylist()
    assert [row["uri"] for row in rows] == [uri for shard in shards for uri in shard.uris]
    assert_same_rows(rows, open_results(one_by_one.output).to_table().to_pylist())


@pytest.mark.parametrize("failing", ["object", "record"])
def test_a_failed_write_fails_its_shard_alone_and_leaves_no_record(
    three_shards: tuple[SegmentConfig, list[Shard]], monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    config, shards = three_shards
    broken = (shard_object if failing == "object" else shard_record)(1)
    write = output_module.atomic.write

    def failing_write(fs: Any, path: str, data: bytes) -> None:
        if path.endswith(broken):
            raise OSError(f"injected: the PUT of {broken} failed")
        write(fs, path, data)

    monkeypatch.setattr(output_module.atomic, "write", failing_write)
    with prepare_job(config) as job:
        processor = ShardProcessor.for_job(job)
    with ThreadPoolExecutor(2) as calls:
        results = [calls.submit(processor.process, shard) for shard in shards]
        with pytest.raises(OSError, match="injected"):
            results[1].result(timeout=WAIT)
        assert [results[i].result(timeout=WAIT).shard for i in (0, 2)] == [0, 2]
    assert sorted(r.shard for r in OutputDir(config.output).records()) == [0, 2]
    assert processor.images_in_progress == 0


def test_an_actor_is_given_the_settings_and_weights_never_the_plan(
    ray_address: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a million shards the job's plan pickles to tens of MB; what an actor is sent stays a few kB."""
    manifest, _, _ = archive(tmp_path, 2, bad=False)
    with prepare_job(SegmentConfig(manifest=manifest, output=str(tmp_path / "out"), weights="none")) as job:
        pass
    fingerprints = tuple(f"{i:032x}" for i in range(1_000_000))  # distinct, as real ones are
    huge = replace(job, plan=replace(job.plan, shard_fingerprints=fingerprints))
    assert len(pickle.dumps(huge)) > 30_000_000
    sent: list[tuple[Any, ...]] = []

    class Recorder:
        """Stands for the actor class: notes what the driver sends an actor."""

        def options(self, **_: Any) -> Recorder:
            return self

        def remote(self, *args: Any) -> Any:
            sent.append(args)
            return SimpleNamespace(ready=SimpleNamespace(remote=lambda: None))

    monkeypatch.setattr(driver_module, "SegmentationActor", Recorder())
    Driver(huge).start_actor()
    (args,) = sent
    by_value = [a for a in args if not isinstance(a, ray.ObjectRef)]
    stored = [ray.get(a) for a in args if isinstance(a, ray.ObjectRef)]  # carried once to each node
    assert len(pickle.dumps(by_value)) < 1_000
    assert [type(s) for s in stored] == [ActorSetup]
    assert len(pickle.dumps(stored)) < 20_000
    assert stored[0].config == job.config and stored[0].provenance == job.provenance


def test_actors_use_the_weights_the_driver_loaded(ray_address: str, tmp_path: pathlib.Path) -> None:
    """The checkpoint is gone once the driver has loaded it: the actors never read it (nor download)."""
    weights = tmp_path / "weights.pt"
    shutil.copy(SHAPES_MODEL, weights)
    manifest, uris, _ = archive(tmp_path, 4, bad=False)
    config = SegmentConfig(
        manifest=manifest,
        output=str(tmp_path / "out"),
        shard_size=2,
        **(SMALL_MODEL | {"weights": str(weights)}),
    )
    with prepare_job(config) as job:
        driver = Driver(job)
        os.remove(weights)
        run = driver.run()
    assert run["shards_failed"] == [] and run["images_this_run"] == 4
    rows = open_results(config.output).to_table().to_pylist()
    assert [row["uri"] for row in rows] == uris
    assert {row["status"] for row in rows} == {"ok"}


@pytest.mark.parametrize(
    ("gpus", "device", "share"),
    [
        (0.5, "cuda", 0.5),
        (0.25, "cuda:0", 0.25),
        (1.0, "cuda", None),
        (2.0, "cuda", None),
        (0.5, "cpu", None),
    ],
)
def test_a_fraction_of_a_gpu_caps_the_actors_share_of_its_memory(
    gpus: float, device: str, share: float | None
) -> None:
    assert gpu_memory_share(gpus, device) == share


@pytest.mark.gpu
def test_an_actor_on_half_a_gpu_cannot_take_more_than_half_its_memory() -> None:
    """In a process of its own (the cap is the process's): half the GPU's memory is refused after it."""
    script = """
import torch
from batchseg.segment.driver import limit_gpu_memory
total = torch.cuda.get_device_properties(0).total_memory
limit_gpu_memory(0.5, "cuda")
held = [torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")]
try:
    held.append(torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError:
    print("refused")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused"]
