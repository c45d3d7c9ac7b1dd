"""Weights resolve from torchvision enums, checkpoints of either format, or nothing; mistakes fail early."""

from __future__ import annotations

import os
import pathlib
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models import get_model, get_model_weights

from batchseg.cli import main
from batchseg.errors import BatchsegError
from batchseg.inference.models import build_model, coco_categories, resolve_weights
from batchseg.inference.predictor import Predictor
from batchseg.inference.registry import MODELS, TRAINABLE, model_spec
from batchseg.train.synth import CATEGORIES, draw_shapes

MODEL = "maskrcnn_resnet50_fpn"


@pytest.fixture(scope="module")
def shapes_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return get_model(MODEL, weights=None, weights_backbone=None, num_classes=len(CATEGORIES)).state_dict()


def test_none_gives_seeded_random_weights_with_coco_names() -> None:
    info = resolve_weights("none", MODEL)
    assert (info.source, info.identity, len(info.categories)) == ("none", "none(seed=0)", 91)
    assert info.categories[1] == "person"
    a, b = build_model(info), build_model(info)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_default_weights_come_from_the_hub_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = get_model_weights("maskrcnn_resnet50_fpn_v2").DEFAULT
    with pytest.raises(BatchsegError, match=f"cannot download {enum.url}.*copy that file to"):
        resolve_weights("DEFAULT")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(enum.url)
    assert not cached.exists(), "a failed download must not leave a file that looks cached"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"placeholder: resolving only checks the file is there")
    info = resolve_weights("DEFAULT")
    assert info.identity == "torchvision:MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    assert (info.model, info.source, len(info.categories)) == ("maskrcnn_resnet50_fpn_v2", "torchvision", 91)
    assert resolve_weights("COCO_V1").identity == info.identity
    assert resolve_weights("MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1").identity == info.identity
    with pytest.raises(BatchsegError, match="not a torchvision weights name"):
        resolve_weights("COCO_V9")
    with pytest.raises(BatchsegError, match="do not belong to model"):
        resolve_weights("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "maskrcnn_resnet50_fpn_v2")


def test_batchseg_checkpoint_carries_model_and_categories(
    tmp_path: pathlib.Path, shapes_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "trained.pt"
    torch.save({"model": shapes_state, "model_name": MODEL, "categories": list(CATEGORIES), "step": 7}, path)
    info = resolve_weights(str(path))  # no --model: the checkpoint says which
    assert (info.model, info.source, info.categories) == (MODEL, "checkpoint", CATEGORIES)
    assert info.identity.startswith("sha256:") and info.uri == str(path)
    with pytest.raises(BatchsegError, match=f"holds a {MODEL} model, not maskrcnn_resnet50_fpn_v2"):
        resolve_weights(str(path), "maskrcnn_resnet50_fpn_v2")
    # The loaded weights are the checkpoint's: the predictor's model equals one built from the state dict.
    predictor = Predictor.from_weights(info, min_size=96, max_size=128, score_threshold=0.0)
    for key, value in shapes_state.items():
        assert torch.equal(predictor.model.state_dict()[key], value), key
    image = draw_shapes(np.random.default_rng(0), 96).pixels
    (instances,) = predictor([image])
    assert instances and {i["category"] for i in instances} <= set(CATEGORIES[1:])


def test_plain_state_dict_gets_generic_or_coco_names(
    tmp_path: pathlib.Path, shapes_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "plain.pth"
    torch.save(shapes_state, path)
    info = resolve_weights(str(path), MODEL)
    assert info.categories == ("__background__", "class_1", "class_2", "class_3")
    relative = os.path.relpath(path)
    assert resolve_weights(relative, MODEL).uri == str(path)


def test_weights_that_do_not_fit_the_model_fail_early(
    tmp_path: pathlib.Path, shapes_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "plain.pth"
    torch.save(shapes_state, path)
    with pytest.raises(BatchsegError, match=r"weights do not fit maskrcnn_resnet50_fpn_v2: .* missing keys"):
        resolve_weights(str(path), "maskrcnn_resnet50_fpn_v2")


def test_unsafe_or_foreign_files_are_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "noise.bin").write_bytes(bytes(range(1, 256)) * 4)
    for name, size in (("notes.txt", 5), ("noise.bin", 1020)):  # neither torch.save's zip nor a pickle
        with pytest.raises(BatchsegError, match=rf"{name} is not a PyTorch checkpoint \({size:,} bytes"):
            resolve_weights(str(tmp_path / name))
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(BatchsegError, match="not a PyTorch checkpoint that loads safely"):
        resolve_weights(str(tmp_path / "cut.pt"))
    with (tmp_path / "code.pkl").open("wb") as f:
        pickle.dump(
            {"model": pathlib.Path("/etc/passwd")}, f, protocol=2
        )  # arbitrary objects: refused by weights_only
    with pytest.raises(
        BatchsegError, match=r"not a plain weights file: it holds a pickled pathlib\.PosixPath"
    ):
        resolve_weights(str(tmp_path / "code.pkl"))
    with pytest.raises(BatchsegError, match=r"weights .*missing.pt do not exist"):
        resolve_weights(str(tmp_path / "missing.pt"))
    with pytest.raises(BatchsegError, match="unknown model 'yolo'"):
        resolve_weights("none", "yolo")


@pytest.mark.parametrize("content", ["model", "custom"])
def test_a_pickled_model_is_refused_in_one_line_that_says_how_to_convert_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    """torch's own refusal is seven lines of advice to load with weights_only=False."""
    model = build_model(resolve_weights("none", "maskrcnn_small"))
    path = tmp_path / "pickled.pt"
    saved = {"model": model, "custom": {"model": model.state_dict(), "root": pathlib.Path("/data")}}[content]
    torch.save(saved, path)
    (tmp_path / "manifest.csv").write_text("uri\nimage.png\n")
    args = ["segment", "--manifest", str(tmp_path / "manifest.csv"), "--output", str(tmp_path / "out")]
    assert main([*args, "--weights", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    refused = "torchvision.models.detection.mask_rcnn.MaskRCNN" if content == "model" else "pathlib.PosixPath"
    assert line.startswith(
        f"batchseg: error: {path} is not a plain weights file: it holds a pickled {refused}"
    )
    assert "refused for safety (batchseg loads weights with weights_only=True)" in line
    assert "torch.save(torch.load(PATH, weights_only=False).state_dict(), NEW_PATH)" in line


@pytest.mark.parametrize("name", list(MODELS))
def test_each_registry_entry_says_what_its_model_is(name: str) -> None:
    """A ModelSpec's facts (mask head, keypoint count, resize, pretrained weights) hold for the model it
    builds."""
    spec = MODELS[name]
    model: Any = build_model(resolve_weights("none", name))
    heads = model.roi_heads
    assert heads.has_mask() == spec.masks
    assert heads.has_keypoint() == (spec.keypoints is not None)
    if spec.keypoints is not None:
        assert heads.keypoint_predictor.kps_score_lowres.out_channels == spec.keypoints
    assert (model.transform.min_size, model.transform.max_size) == ((spec.min_size,), spec.max_size)
    assert spec.trainable == (name in TRAINABLE) == spec.masks
    if spec.pretrained:
        assert spec.categories_from == name  # its labels are named by its own weights' categories
        assert len(coco_categories(name)) == len(get_model_weights(name).DEFAULT.meta["categories"])
    else:
        with pytest.raises(BatchsegError, match="has no pretrained weights"):
            resolve_weights("DEFAULT", name)
    with pytest.raises(
        BatchsegError, match="unknown model 'resnet9000'; choose one of: maskrcnn_resnet50_fpn_v2"
    ):
        model_spec("resnet9000")


def test_an_image_squeezed_under_a_pixel_by_the_resize_still_trains() -> None:
    """The resize keeps a 4 x 3000 image's short side at one pixel, targets mapped along (inference:
    tests/test_predictor.py)."""
    model: Any = build_model(resolve_weights("none", "maskrcnn_small")).train()
    masks = torch.zeros(1, 4, 3000, dtype=torch.uint8)
    masks[0, :, :1500] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 1500.0, 4.0]]), "labels": torch.tensor([1]), "masks": masks}
    image, resized = model.transform.resize(torch.rand(3, 4, 3000), dict(target))
    assert image.shape == (3, 1, 256) and resized["masks"].shape == (1, 1, 256)
    assert resized["boxes"].tolist() == [[0.0, 0.0, 128.0, 1.0]]
    losses = model([torch.rand(3, 4, 3000)], [target])
    assert all(torch.isfinite(loss) for loss in losses.values())
