"""Fine-tuning as torchvision does it: from pretrained weights a frozen-BatchNorm backbone whose first stages
stay as the file had them; from scratch BatchNorm that trains (synchronised on request); what checkpoints
and ``model.pt`` record of it, and that a fine-tuned model loads for ``segment`` and for a resume."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError
from batchseg.inference.models import (
    BackboneTraining,
    WeightsInfo,
    build_model,
    freeze_backbone,
    load_state_dict,
    read_checkpoint,
    resolve_weights,
    split_checkpoint,
)
from batchseg.train.config import TrainConfig
from batchseg.train.data import CocoInstances, collate
from batchseg.train.engine import make_optimizer, make_scheduler, train_one_epoch
from batchseg.train.synth import SynthDataset, write_dataset
from batchseg.train.trainer import (
    backbone_training,
    restore_training_state,
    train_model,
    training_state,
)

BATCHNORM_STATISTICS = ("running_mean", "running_var")
BATCHNORM_VALUES = ("weight", "bias", *BATCHNORM_STATISTICS)
BODY = "backbone.body."  # the ResNet trunk's keys


def is_conv(key: str) -> bool:
    """A ResNet-18 trunk key that is a convolution's weight; every other one belongs to a BatchNorm."""
    return key.endswith(".weight") and (
        ".conv" in key or key.startswith(f"{BODY}conv") or "downsample.0" in key
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return write_dataset(str(tmp_path_factory.mktemp("shapes")), 6, seed=3, size=96)


def config_for(shapes: SynthDataset, output: pathlib.Path, **changes: Any) -> TrainConfig:
    options: dict[str, Any] = {
        "iterations": 3,
        "batch_size": 2,
        "min_sizes": (96,),
        "max_size": 128,
    } | changes
    return TrainConfig(images=shapes.images, annotations=shapes.annotations, output=str(output), **options)


def train_steps(model: torch.nn.Module, data: CocoInstances, steps: int) -> None:
    """``steps`` optimizer steps (AdamW, no warmup) on the first images of ``data``, as a worker takes them."""
    optimizer = make_optimizer(model, "adamw", 1e-3, 1e-4)
    batch = collate([data[0], data[1]])
    done = train_one_epoch(
        model,
        optimizer,
        make_scheduler(optimizer, steps, 0, "cosine"),
        [batch] * steps,
        torch.device("cpu"),
        step=0,
        max_steps=steps,
    )
    assert done == steps


def trainable(body: torch.nn.Module) -> set[str]:
    return {name for name, parameter in body.named_parameters() if parameter.requires_grad}


def frozen_batchnorm(body: torch.nn.Module) -> set[str]:
    return {name for name, module in body.named_modules() if isinstance(module, FrozenBatchNorm2d)}


def test_the_fine_tuning_backbone_is_torchvisions_for_every_trainable_layers() -> None:
    """The same stages train and the same BatchNorm layers are frozen as in torchvision's own fine-tuning
    backbone (``_resnet_fpn_extractor`` over a ResNet with ``FrozenBatchNorm2d``), for ResNet-50 and for
    maskrcnn_small's ResNet-18 that ends at layer3."""
    body50: Any = build_model(WeightsInfo("maskrcnn_resnet50_fpn", "none", "", "", ("a", "b"))).backbone.body
    small: Any = build_model(WeightsInfo("maskrcnn_small", "none", "", "", ("a", "b"))).backbone.body
    fresh50 = {k: v.clone() for k, v in body50.state_dict().items()}
    fresh_small = {k: v.clone() for k, v in small.state_dict().items()}
    for layers in range(6):
        for body, fresh, theirs in (
            (body50, fresh50, _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), layers).body),
            (
                small,
                fresh_small,
                _resnet_fpn_extractor(
                    resnet18(norm_layer=FrozenBatchNorm2d), layers, returned_layers=[1, 2, 3]
                ).body,
            ),
        ):
            for parameter in body.parameters():
                parameter.requires_grad_(True)  # as built: the freezing of the last round undone
            freeze_backbone(body, layers)
            assert trainable(body) == trainable(theirs), layers
            assert frozen_batchnorm(body) == frozen_batchnorm(theirs)
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
            # a frozen BatchNorm holds the values the plain one had
            state = body.state_dict()
            assert all(
                torch.equal(state[k], v) for k, v in fresh.items() if not k.endswith("num_batches_tracked")
            )
    assert len(trainable(body50)) == 53 and len(trainable(small)) == 15  # at 5: every conv


def test_a_fine_tune_from_a_checkpoint_leaves_the_frozen_layers_as_the_file_had_them(
    shapes: SynthDataset, tmp_path: pathlib.Path, one_thread: None
) -> None:
    """Three steps from the shipped shapes model (a batchseg checkpoint, 4 classes as the data set): conv1,
    layer1 and every BatchNorm statistic and affine value are bit-identical to the file; layer2, layer3,
    the FPN and the heads trained."""
    config = config_for(shapes, tmp_path / "run", weights=str(SHAPES_MODEL))
    weights = resolve_weights(config.weights, config.model)
    model = train_model(weights, CocoInstances(shapes.images, shapes.annotations).categories, config)
    train_steps(model, CocoInstances(shapes.images, shapes.annotations, flip=True), 3)
    start = split_checkpoint(read_checkpoint(str(SHAPES_MODEL))[1])[0]
    after = model.state_dict()
    trunk: Any = model.backbone.body
    frozen = [f"{BODY}{name}.{value}" for name in frozen_batchnorm(trunk) for value in BATCHNORM_VALUES]
    frozen += [f"{BODY}{name}" for name, parameter in trunk.named_parameters() if not parameter.requires_grad]
    assert len(frozen) == 15 * 4 + 5  # 15 BatchNorm x 4 values, the convs of conv1 and layer1
    for key in frozen:
        assert torch.equal(after[key], start[key]), key
    changed = [k for k in after if not torch.equal(after[k], start[k])]
    assert {k.split(".")[2] for k in changed if k.startswith(BODY)} == {"layer2", "layer3"}
    assert all(is_conv(k) for k in changed if k.startswith(BODY))
    assert any(k.startswith("backbone.fpn.") for k in changed)
    assert any(k.startswith("roi_heads.mask_predictor.") for k in changed)
    assert not [k for k in after if k.startswith(BODY) and k.endswith("num_batches_tracked")]


def test_from_scratch_batchnorm_trains_and_can_be_synchronised(
    shapes: SynthDataset, tmp_path: pathlib.Path, one_thread: None
) -> None:
    data = CocoInstances(shapes.images, shapes.annotations)
    scratch = resolve_weights("none", "maskrcnn_small")
    model = train_model(scratch, data.categories, config_for(shapes, tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert backbone_training(scratch, config_for(shapes, tmp_path)).record() == {
        "frozen_batchnorm": False,
        "trainable_layers": 5,
        "sync_batchnorm": False,
    }
    assert all(parameter.requires_grad for parameter in model.parameters())
    train_steps(model, data, 1)
    statistics = [k for k in before if k.startswith(BODY) and k.endswith(BATCHNORM_STATISTICS)]
    assert len(statistics) == 30
    assert all(not torch.equal(model.state_dict()[k], before[k]) for k in statistics)  # every one moved

    synchronised = train_model(
        scratch, data.categories, config_for(shapes, tmp_path, sync_batchnorm=True, gpus_per_worker=1)
    )
    norms = [m for m in synchronised.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 15 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert synchronised.state_dict().keys() == before.keys()  # a model.pt as any other
    train_steps(synchronised, data, 1)  # one process: torch's plain BatchNorm, no process group to sync


def test_a_fine_tuned_model_loads_for_segment_and_for_a_resume(
    shapes: SynthDataset, tmp_path: pathlib.Path, one_thread: None
) -> None:
    """Its frozen BatchNorm has no batch counters: ``segment`` builds plain BatchNorm from it, which in
    eval mode computes what the frozen one did; a resume loads it (with the GradScaler's state) strictly."""
    data = CocoInstances(shapes.images, shapes.annotations)
    config = config_for(shapes, tmp_path / "run", weights=str(SHAPES_MODEL), trainable_backbone_layers=4)
    weights = resolve_weights(config.weights, config.model)
    backbone = backbone_training(weights, config)
    assert backbone == BackboneTraining(frozen_batchnorm=True, trainable_layers=4)
    model = train_model(weights, data.categories, config)
    optimizer = make_optimizer(model, "adamw", 1e-3, 1e-4)
    scheduler = make_scheduler(optimizer, 10, 0, "cosine")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    model.train()
    for _ in range(2):  # finite gradients at every step: the scale doubles each time
        loss = sum(model(*collate([data[0]])).values())
        assert isinstance(loss, torch.Tensor)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    assert scaler.get_scale() == 1024.0
    saved = training_state(backbone, model, optimizer, scheduler, scaler) | {"step": 2}
    path = tmp_path / "model.pt"
    meta = {
        "model_name": "maskrcnn_small",
        "categories": list(data.categories),
        "min_size": 96,
        "max_size": 128,
    }
    torch.save(saved | meta, path)

    model.eval()
    image = data[1][0]
    with torch.no_grad():
        expected = model([image])[0]
    assert len(expected["boxes"]) > 0
    segment = resolve_weights(str(path))
    # as segment builds it, at the resize it was trained for: plain BatchNorm
    deployed = build_model(
        segment, load_state_dict(segment), min_size=segment.min_size, max_size=segment.max_size
    )
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        found = deployed([image])[0]
    torch.testing.assert_close(found["boxes"], expected["boxes"])
    torch.testing.assert_close(found["scores"], expected["scores"])

    resumed = train_model(weights, data.categories, config)
    optimizer = make_optimizer(resumed, "adamw", 1e-3, 1e-4)
    scheduler = make_scheduler(optimizer, 10, 0, "cosine")
    fresh_scaler = torch.amp.GradScaler("cpu")
    restore_training_state(
        torch.load(path, weights_only=True), backbone, resumed, optimizer, scheduler, fresh_scaler
    )
    assert fresh_scaler.get_scale() == 1024.0 and scheduler.last_epoch == 2
    assert all(torch.equal(v, saved["model"][k]) for k, v in resumed.state_dict().items())

    other = BackboneTraining(frozen_batchnorm=True, trainable_layers=3)
    with pytest.raises(BatchsegError, match=r"trainable_layers 4 \(this run: 3\): resume with the same"):
        restore_training_state(saved, other, resumed, optimizer, scheduler, fresh_scaler)


def assert_trunk_frozen_as_started(final: dict[str, torch.Tensor]) -> None:
    """A ``model.pt``'s trunk fine-tuned from the shipped shapes model with ``--trainable-backbone-layers 2``
    (layer4 and layer3; maskrcnn_small's ends at layer3): every BatchNorm value and every convolution of
    conv1, layer1 and layer2 bit-identical to the file it started from, layer3's convolutions trained.
    Through Ray Train in test_train_parquet.py's round trip (one TorchTrainer less in the suite)."""
    start = split_checkpoint(read_checkpoint(str(SHAPES_MODEL))[1])[0]
    trunk = {k: v for k, v in final.items() if k.startswith(BODY)}
    assert {k.split(".")[2] for k in trunk} == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    trained = [k for k in trunk if k.startswith(f"{BODY}layer3.") and is_conv(k)]
    assert len(trained) == 5
    for key, value in trunk.items():  # every BatchNorm value, every conv of conv1, layer1 and layer2
        if key not in trained:
            assert torch.equal(value, start[key]), key
    assert all(not torch.equal(trunk[k], start[k]) for k in trained)
