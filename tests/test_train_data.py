"""Training's data path: an epoch's block-shuffled order, each worker's share, chunks read once, a run's
progress and schedule across changes of the worker count, and the loader's batches (prefetched, uint8,
unreadable images left out) equal to the samples read one by one."""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import torch

from batchseg.errors import BatchsegError
from batchseg.io.images import decode_image
from batchseg.train.config import TrainConfig, worker_count
from batchseg.train.data import CocoInstances, boxes_of, instance_mask, to_sample
from batchseg.train.engine import lr_factor, make_scheduler, on_device, train_one_epoch
from batchseg.train.examples import CocoTrainingSet, Example, open_training_set
from batchseg.train.loader import TrainingLoader
from batchseg.train.sampling import EpochOrder, Progress, cut, examples_at, positions
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import worker_batches


class Chunks:
    """A training set of ``sizes`` chunks of made-up examples, counting its chunk reads."""

    categories = ("__background__", "thing")

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.chunk_sizes = sizes
        self.reads: list[int] = []

    def read_chunk(self, index: int) -> list[Example]:
        self.reads.append(index)
        return [Example(f"{index}/{row}", "", 1, 1, (), ()) for row in range(self.chunk_sizes[index])]


def test_an_epoch_is_every_example_once_in_an_order_drawn_from_seed_and_epoch() -> None:
    sizes = (5, 0, 7, 3)
    order = EpochOrder(sizes, seed=1, epoch=0)
    positions = [order[p] for p in range(len(order))]
    assert sorted(positions) == [(c, r) for c, n in enumerate(sizes) for r in range(n)]
    assert positions == [EpochOrder(sizes, seed=1, epoch=0)[p] for p in range(15)]
    assert positions != [EpochOrder(sizes, seed=1, epoch=1)[p] for p in range(15)]
    assert positions != [EpochOrder(sizes, seed=2, epoch=0)[p] for p in range(15)]
    chunks = [c for c, _ in positions]
    assert sum(a != b for a, b in itertools.pairwise(chunks)) == 2  # 3 chunks with examples, each together


@pytest.mark.parametrize(("total", "world", "batch"), [(10, 1, 4), (10, 3, 2), (7, 2, 4), (1, 4, 1)])
def test_the_shares_cover_the_epoch_with_the_same_steps_on_every_rank(
    total: int, world: int, batch: int
) -> None:
    start = Progress.start(total)
    shares = [list(positions(start.share(rank, world, batch))) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % batch == 0
    assert len(shares[0]) == start.steps(world, batch) * batch
    covered = [p for s in shares for p in s]
    assert set(covered) == set(range(total)) and len(covered) < total + world * batch
    # contiguous shares in rank order, each padded with its own first positions (all of it, if it has none)
    assert [p for s in shares if total >= world for p in dict.fromkeys(s)] == list(range(total)) * (
        total >= world
    )
    assert all(s[len(set(s)) :] == s[: len(s) - len(set(s))] for s in shares if total >= world)


def test_a_worker_reads_each_of_its_chunks_once() -> None:
    data = Chunks((4, 4, 4, 4, 4))
    order = EpochOrder(data.chunk_sizes, seed=0, epoch=3)
    ids = [e.image_id for e in examples_at(data, order, positions(Progress.start(20).share(1, 2, 2)))]
    assert len(ids) == 10 and len(data.reads) == len(set(data.reads)) <= 4
    assert ids == [f"{c}/{r}" for c, r in (order[p] for p in range(10, 20))]


def test_cut_takes_positions_by_count_across_intervals() -> None:
    intervals = [(2, 5), (9, 10), (20, 24)]
    assert cut(intervals, 0, 8) == intervals
    assert cut(intervals, 2, 6) == [(4, 5), (9, 10), (20, 22)]
    assert cut(intervals, 3, 4) == [(9, 10)] and cut(intervals, 8, 9) == [] and cut(intervals, 5, 5) == []


def train(
    progress: Progress, world: int, batch: int, steps: int, trained: Counter[tuple[int, int]]
) -> Progress:
    """``steps`` steps of each of ``world`` ranks, as the trainer takes them: each rank's share of what
    remains, its first ``steps`` batches, counted in ``trained`` as (epoch, position)."""
    for rank in range(world):
        share = list(positions(progress.share(rank, world, batch)))
        trained.update((progress.epoch, p) for p in share[: steps * batch])
    return progress.advance(steps, world, batch)


# (workers, steps): two workers, then one, then three from mid-epoch, then four, across epoch ends
RESIZES = [(2, 3), (1, 5), (3, 4), (4, 6), (2, 2)]
WHOLE_STEPS = [(2, 3), (1, 6), (4, 3), (3, 2), (2, 3)]  # every stretch a whole number of steps: no padding


@pytest.mark.parametrize(
    ("examples", "batch", "resizes"),
    [(24, 2, WHOLE_STEPS), (24, 2, RESIZES), (23, 2, RESIZES), (10, 3, RESIZES)],
)
def test_a_run_that_changes_its_worker_count_trains_on_each_position_of_each_epoch_once(
    examples: int, batch: int, resizes: list[tuple[int, int]]
) -> None:
    progress, trained = Progress.start(examples), Counter[tuple[int, int]]()
    for world, steps in resizes:
        while steps:  # the trainer's stretches end at an epoch's end
            stretch = min(steps, progress.steps(world, batch))
            seen = progress.images_after(stretch, world, batch)
            progress = train(progress, world, batch, stretch, trained)
            assert progress.images_seen == seen
            steps -= stretch
        done = {key for key in trained if key[0] < progress.epoch}
        assert done == {(e, p) for e in range(progress.epoch) for p in range(examples)}  # whole epochs
        current = {p for e, p in trained if e == progress.epoch}
        assert current.isdisjoint(positions(progress.remaining))  # what remains was never trained on
        assert current | set(positions(progress.remaining)) == set(range(examples))
        assert progress.images_seen == len(done) + len(current)
    assert progress.step == sum(steps for _, steps in resizes) and progress.epoch >= 2
    padded = sum(trained.values()) - len(trained)
    if resizes is WHOLE_STEPS:  # what remains always divides into whole steps: each position exactly once
        assert padded == 0 and progress.epoch == 3 and progress.images_seen == 3 * examples
    else:  # padded duplicates only in an epoch's last step: less than a batch per rank
        assert 0 < padded < (progress.epoch + 1) * max(world for world, _ in resizes) * batch


def test_progress_survives_the_checkpoint_and_a_checkpoint_without_it_is_replayed_from_its_steps() -> None:
    progress = Progress.start(20).advance(2, 2, 2).advance(1, 3, 2)
    assert progress.remaining == ((6, 8), (14, 16), (18, 20)) and progress.images_seen == 14
    assert Progress.restore(20, progress.state()) == progress
    assert progress.state()["images_seen"] == 14
    # before progress was recorded, a run of 2 workers x 2 images: 5 steps an epoch, so step 7 is epoch 1
    # with 2 steps of each rank's share done
    assert Progress.after_steps(20, 7, 2, 2) == Progress(20, 7, 1, ((4, 10), (14, 20)))


def run_to(progress: Progress, total: int, world: int, batch: int) -> Progress:
    """Stretches of training as the trainer takes them (to the end of an epoch or of the run) until
    ``total`` images have been seen."""
    while progress.images_seen < total:
        progress = progress.advance(progress.steps_to(total, world, batch), world, batch)
    return progress


def test_a_run_ends_after_its_images_on_any_number_of_workers() -> None:
    # --iterations 6 at 2 workers x batch 2: 24 images, 6 steps at 2 workers, 12 at 1
    total = 6 * 2 * 2
    for world, steps, remaining in ((2, 6, ((4, 8), (12, 16))), (1, 12, ((8, 16),))):
        end = run_to(Progress.start(16), total, world, 2)
        assert (end.step, end.images_seen, end.epoch, end.remaining) == (steps, total, 1, remaining)
    # killed after 2 steps of 2 workers, resumed on 1: the steps go on, the images end where planned
    progress = Progress.start(16).advance(2, 2, 2)
    assert progress.images_seen == 2 * 2 * 2
    end = run_to(progress, total, 1, 2)
    assert (end.step, end.images_seen) == (2 + (total - 8) // 2, total)
    # an epoch of 10 on 2 x 2 is 3 steps, the last padded by 2: padding is trained but never counted as seen
    assert (run_to(Progress.start(10), total, 2, 2).step, run_to(Progress.start(10), total, 2, 2).epoch) == (
        7,
        2,
    )


def scheduled(
    world: int, progress: Progress, total: int, steps: int, saved: dict[str, Any] | None = None
) -> tuple[Progress, dict[int, float], dict[str, Any]]:
    """``steps`` steps (at most) of the trainer's schedule on ``world`` workers of batch 2, from ``saved``
    (the optimizer's and scheduler's state, as a checkpoint holds them): the learning rate by images seen."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    at = {"start": progress}  # the trainer's: the steps -> images of where this stretch began
    scheduler = make_scheduler(
        optimizer,
        total,
        8,
        "cosine",
        lambda step: at["start"].images_after(step - at["start"].step, world, 2),
    )
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    lrs = {progress.images_seen: optimizer.param_groups[0]["lr"]}
    for _ in range(steps):
        if progress.images_seen >= total:
            break
        at["start"] = progress  # stretches of one step here: the shortest the trainer could take
        optimizer.step()
        scheduler.step()
        progress = progress.advance(1, world, 2)
        lrs[progress.images_seen] = optimizer.param_groups[0]["lr"]
    return progress, lrs, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def test_the_schedule_is_a_function_of_images_seen_whatever_the_worker_count() -> None:
    total = 64
    for world in (1, 2, 4):
        progress, lrs, _ = scheduled(world, Progress.start(16), total, 100)
        assert lrs == {i: pytest.approx(0.5 * lr_factor(i, total, 8, "cosine")) for i in lrs}
        assert len(lrs) == total // (2 * world) + 1 and lrs[total] == pytest.approx(0)
        assert progress.step == total // (2 * world)
    # 3 steps on 4 workers, then resumed from their state on 1: the rates go on along the same curve
    progress, before, saved = scheduled(4, Progress.start(16), total, 3)
    progress, after, _ = scheduled(1, progress, total, 100, saved)
    assert min(after) == 24 and after[24] == before[24] and progress.step == 3 + (64 - 24) // 2
    lrs = before | after
    assert lrs == {i: pytest.approx(0.5 * lr_factor(i, total, 8, "cosine")) for i in lrs}
    assert lr_factor(0, 10, 2, "cosine") == 0.001 and lr_factor(2, 10, 2, "cosine") == 1
    assert [lr_factor(i, 10, 0, "step") for i in (6, 7, 9)] == pytest.approx([1, 0.1, 0.01])


def test_workers_is_n_or_min_max_and_sgds_rate_follows_the_most() -> None:
    assert (worker_count("3"), worker_count("1,4")) == (3, (1, 4))
    config = TrainConfig(
        images="i", annotations="a", output="o", workers=(1, 4), batch_size=2, optimizer="sgd", iterations=1
    )
    assert config.learning_rate == 0.02 * 2 * 4 / 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> CocoTrainingSet:
    data = write_dataset(str(tmp_path_factory.mktemp("shapes")), 9, seed=3, size=64)
    return CocoTrainingSet(data.images, data.annotations)


def epoch(examples: list[Example], number: int = 0) -> list[tuple[int, Example]]:
    return [(number, example) for example in examples]


def test_batches_are_the_samples_read_one_by_one_as_uint8(shapes: CocoTrainingSet) -> None:
    one_by_one = CocoInstances(shapes.images, shapes.annotations)
    batches = list(TrainingLoader(prefetch=3, threads=2, flip=False).batches(epoch(shapes.examples), 4))
    assert [len(images) for images, _ in batches] == [4, 4, 1]
    for index, (image, target) in enumerate(
        s for images, targets in batches for s in zip(images, targets, strict=True)
    ):
        expected_image, expected = one_by_one[index]
        assert image.dtype == torch.uint8
        torch.testing.assert_close(image.float().div(255), expected_image)
        for key in ("boxes", "labels", "masks", "image_id"):
            torch.testing.assert_close(target[key], expected[key])


def test_flips_are_drawn_from_seed_epoch_and_image_not_from_the_threads(shapes: CocoTrainingSet) -> None:
    def flipped(seed: int, number: int) -> list[bool]:
        loader = TrainingLoader(threads=3, seed=seed)
        plain = TrainingLoader(threads=1, flip=False).batches(epoch(shapes.examples), 9)
        images = next(loader.batches(epoch(shapes.examples, number), 9))[0]
        return [not torch.equal(a, b) for a, b in zip(images, next(plain)[0], strict=True)]

    assert flipped(0, 0) == flipped(0, 0) and 0 < sum(flipped(0, 0)) < 9
    assert flipped(0, 1) != flipped(0, 0)


def test_unreadable_images_are_left_out_and_a_batch_of_none_takes_the_last_readable(
    shapes: CocoTrainingSet, tmp_path: pathlib.Path
) -> None:
    broken = [replace(e, uri=str(tmp_path / f"missing-{i}.jpg")) for i, e in enumerate(shapes.examples)]
    examples = [shapes.examples[0], broken[1], broken[2], broken[3], *shapes.examples[4:6]]
    loader = TrainingLoader(flip=False)
    batches = list(loader.batches(epoch(examples), 2))
    assert [[int(t["image_id"]) for t in targets] for _, targets in batches] == [[1], [1], [5, 6]]
    assert loader.unreadable == 3
    # The first batch unreadable: it borrows the next readable image, which still trains in its own batch.
    batches = list(loader.batches(epoch([broken[0], broken[1], *shapes.examples[2:4]]), 2))
    assert [[int(t["image_id"]) for t in targets] for _, targets in batches] == [[3], [3, 4]]
    with pytest.raises(BatchsegError, match="none of this worker's images"):
        list(loader.batches(epoch(broken[:3]), 2))


def test_the_reads_begin_when_the_batches_are_made_not_at_the_first_asked_for(
    shapes: CocoTrainingSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So they wait on storage while the worker still builds its model or trains on what came before."""
    loader = TrainingLoader(prefetch=5, flip=False)
    asked: list[str] = []
    fetch = loader.images.reader.fetch
    monkeypatch.setattr(loader.images.reader, "fetch", lambda uri: asked.append(uri) or fetch(uri))
    batches = loader.batches(epoch(shapes.examples), 2)
    assert asked == [e.uri for e in shapes.examples[:5]]
    assert [len(images) for images, _ in batches] == [2, 2, 2, 2, 1]


class Recorder(torch.nn.Module):
    """A model that notes the image ids of each batch it trains on (one parameter, a constant loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: list[list[int]] = []

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        assert all(image.dtype == torch.float32 for image in images)  # made float "on the device"
        self.seen.append([int(t["image_id"]) for t in targets])
        return {"loss": self.weight * 1.0}


def test_one_stream_runs_through_checkpoint_windows_and_epochs_as_separate_ones_would(
    shapes: CocoTrainingSet, tmp_path: pathlib.Path
) -> None:
    """A worker's batches are one stream for the run (reads ahead across checkpoints and epochs): the same
    batches, flips included, as each epoch's own, and resuming mid-epoch gives the rest of that stream
    (where an epoch is whole steps: else a resumed rank pads its last step from what it has left)."""
    config = TrainConfig(
        images=shapes.images, annotations=shapes.annotations, output=str(tmp_path), batch_size=3
    )
    loader = TrainingLoader(prefetch=4, threads=2)

    def batches(progress: Progress) -> list[tuple[list[torch.Tensor], list[int]]]:
        stream = worker_batches(shapes, loader, config, progress, 18, 0, 1)  # to the end of epoch 1
        return [(images, [int(t["image_id"]) for t in targets]) for images, targets in stream]

    whole = batches(Progress.start(9))  # 9 images in batches of 3: 3 steps an epoch
    assert {i for _, ids in whole[:3] for i in ids} == {int(e.image_id) for e in shapes.examples}
    for part, start in (
        (batches(Progress.start(9, epoch=1)), 3),
        (batches(Progress.start(9).advance(2, 1, 3)), 2),
    ):
        assert [ids for _, ids in part] == [ids for _, ids in whole[start:]]
        for (images, _), (expected, _) in zip(part, whole[start:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(images, expected, strict=True))
    # Checkpoint windows of 2, 2 and 2 steps over one stream take every batch once, in order.
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = make_scheduler(optimizer, 6, 0, "cosine")
    stream = worker_batches(shapes, loader, config, Progress.start(9), 18, 0, 1)
    step = 0
    for stop in (2, 4, 6):
        step = train_one_epoch(
            model, optimizer, scheduler, stream, torch.device("cpu"), step=step, max_steps=stop
        )
        assert step == stop and len(model.seen) == stop
    assert model.seen == [ids for _, ids in whole] and next(stream, None) is None


@pytest.mark.gpu
def test_on_cuda_images_and_targets_come_pinned_and_reach_the_device(shapes: CocoTrainingSet) -> None:
    images, targets = next(TrainingLoader(pin_memory=True).batches(epoch(shapes.examples), 2))
    assert all(image.is_pinned() for image in images)
    assert all(value.is_pinned() for target in targets for value in target.values())
    on_gpu = on_device(images[0], torch.device("cuda"))
    assert on_gpu.is_cuda and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), images[0].float() / 255)


def test_boxes_of_masks_are_those_of_their_pixels_at_the_borders_and_of_one_pixel() -> None:
    masks = torch.zeros((5, 7, 9), dtype=torch.uint8)
    masks[0] = 1  # the whole image
    masks[1, 6, 8] = 1  # one pixel, in the last row and column
    masks[2, 0, 0] = masks[2, 3, 5] = 1  # two pixels apart
    masks[3, 2:5, 0] = 1  # a line on the left border
    masks[4] = torch.rand((7, 9), generator=torch.Generator().manual_seed(0)) > 0.8
    expected = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        expected.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert boxes_of(masks).tolist() == torch.tensor(expected, dtype=torch.float32).tolist()
    assert boxes_of(masks).dtype == torch.float32


def test_a_flipped_sample_is_the_mirror_image_of_the_sample(shapes: CocoTrainingSet) -> None:
    example = shapes.examples[0]
    pixels = decode_image(pathlib.Path(example.uri).read_bytes())
    (image, target), (mirrored, flipped) = to_sample(example, pixels), to_sample(example, pixels, flip=True)
    assert torch.equal(mirrored, image.flip(-1)) and mirrored.is_contiguous()
    assert torch.equal(flipped["masks"], target["masks"].flip(-1)) and flipped["masks"].is_contiguous()
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    assert torch.equal(flipped["boxes"], torch.stack([example.width - x2, y1, example.width - x1, y2], 1))
    assert torch.equal(flipped["labels"], target["labels"])


def test_annotations_pycocotools_would_misread_are_dropped_and_counted_by_reason_in_one_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2-point polygon crashed the worker (pycocotools takes 4 numbers for a box); an RLE of another size
    failed its batch. Each is dropped on the driver, counted with the crowd ones, and the rest train."""
    data = write_dataset(str(tmp_path), 2, seed=3, size=64)
    coco = json.loads(pathlib.Path(data.annotations).read_text())
    good = coco["annotations"][0]
    triangle = [10, 10, 30, 10, 20, 30]
    added = [
        {"segmentation": [[1, 1, 5, 5]]},
        {"segmentation": [[1, 1, 5, 5, 9]]},  # an odd count: no polygon either
        {"segmentation": {"size": [10, 10], "counts": [100]}},
        {"segmentation": {"size": [9, 9], "counts": good["segmentation"]["counts"]}},
        {"category_id": 99},
        {"iscrowd": 1},
        {"bbox": [0, 0, float("nan"), 5]},
        {"image_id": 999},
        {"segmentation": "a string"},
        {"segmentation": [[1, 1, 5, 5], triangle]},  # kept, without the piece of 2 points
    ]
    coco["annotations"] += [good | change | {"id": 100 + i} for i, change in enumerate(added)]
    path = tmp_path / "some-unusable.json"
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        data_set = open_training_set(data.images, str(path))
    total = len(coco["annotations"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 9 of {total} annotations dropped (2 without a polygon of 3 points or more, 2 with an RLE "
        "not of its image's height and width, 1 of a category id not in 'categories', 1 crowd, 1 with a "
        "box of no size, NaN or outside the image, 1 of an image id not in 'images', 1 with a segmentation "
        "that is neither polygons nor RLE); polygons of fewer than 3 points taken out of kept "
        "annotations: 1; 0 images without instances left out of training"
    ]
    first, second = data_set.read_chunk(0)
    original = [a for a in coco["annotations"][: -len(added)] if a["image_id"] == good["image_id"]]
    assert len(first.labels) == len(original) + 1 and first.segmentations[-1] == [triangle]
    loader = TrainingLoader(threads=1, flip=False)
    (images, targets), *_ = loader.batches(epoch([first, second]), 2)  # crashed in the worker
    assert len(images) == 2 and loader.unreadable == 0
    assert len(targets[0]["labels"]) == len(original) + 1  # the triangle's mask is not empty
    assert targets[0]["masks"][-1].sum() == instance_mask([triangle], first.height, first.width).sum() > 0
