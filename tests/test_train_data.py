"""Training's data path: an epoch's block-shuffled order, each worker's share, chunks read once, and the
loader's batches (prefetched, uint8, unreadable images left out) equal to the samples read one by one."""

from __future__ import annotations

import itertools
import pathlib
from dataclasses import replace

import pytest
import torch

from batchseg.errors import BatchsegError
from batchseg.io.images import decode_image
from batchseg.train.config import TrainConfig
from batchseg.train.data import CocoInstances, boxes_of, to_sample
from batchseg.train.engine import make_scheduler, on_device, train_one_epoch
from batchseg.train.examples import CocoTrainingSet, Example
from batchseg.train.loader import TrainingLoader
from batchseg.train.sampling import EpochOrder, examples_at, share
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import _epoch_batches


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
    assert sum(a != b for a, b in itertools.pairwise(chunks)) == 2  # a chunk's examples together: 3 changes


@pytest.mark.parametrize(("total", "world", "batch"), [(10, 1, 4), (10, 3, 2), (7, 2, 4), (1, 4, 1)])
def test_the_shares_cover_the_epoch_with_the_same_steps_on_every_rank(
    total: int, world: int, batch: int
) -> None:
    shares = [share(total, rank, world, batch) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % batch == 0
    covered = [p % total for s in shares for p in s]
    assert set(covered) == set(range(total)) and len(covered) < total + world * batch


def test_a_worker_reads_each_of_its_chunks_once() -> None:
    data = Chunks((4, 4, 4, 4, 4))
    order = EpochOrder(data.chunk_sizes, seed=0, epoch=3)
    ids = [e.image_id for e in examples_at(data, order, share(20, 1, 2, 2))]
    assert len(ids) == 10 and len(data.reads) == len(set(data.reads)) <= 4
    assert ids == [f"{c}/{r}" for c, r in (order[p] for p in range(10, 20))]


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
    fetch = loader.reader.fetch
    monkeypatch.setattr(loader.reader, "fetch", lambda uri: asked.append(uri) or fetch(uri))
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
    batches, flips included, as each epoch's own, and resuming mid-epoch gives the rest of that stream."""
    config = TrainConfig(
        images=shapes.images, annotations=shapes.annotations, output=str(tmp_path), batch_size=4
    )
    loader = TrainingLoader(prefetch=4, threads=2)

    def batches(first_epoch: int, skip: int, steps: int) -> list[tuple[list[torch.Tensor], list[int]]]:
        stream = _epoch_batches(shapes, loader, config, first_epoch, 0, 1, skip, steps)
        return [(images, [int(t["image_id"]) for t in targets]) for images, targets in stream]

    whole = batches(0, 0, 6)  # 9 images in batches of 4: 3 steps an epoch (the last wraps around)
    assert {i for _, ids in whole[:3] for i in ids} == {int(e.image_id) for e in shapes.examples}
    for part, start in ((batches(1, 0, 3), 3), (batches(0, 2, 4), 2)):
        assert [ids for _, ids in part] == [ids for _, ids in whole[start:]]
        for (images, _), (expected, _) in zip(part, whole[start:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(images, expected, strict=True))
    # Checkpoint windows of 2, 2 and 2 steps over one stream take every batch once, in order.
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = make_scheduler(optimizer, 6, 0, "cosine")
    stream = _epoch_batches(shapes, loader, config, 0, 0, 1, 0, 6)
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
