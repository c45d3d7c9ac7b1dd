"""Building the registry's models and resolving where their weights come from (torchvision enums,
checkpoints, none)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import math
import os
import pickle
import re
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.models import get_model, get_model_weights, get_weight, resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    _resize_image_and_masks,
    resize_boxes,
    resize_keypoints,
)
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from batchseg.errors import BatchsegError, job_errors
from batchseg.inference.registry import (
    DEFAULT_MODEL,
    RESNET_STAGES,
    TORCHVISION,
    TRAINABLE_BACKBONE_LAYERS,
    ModelSpec,
    model_spec,
)
from batchseg.io import retries, storage

RANDOM_SEED = 0
# "DEFAULT", "COCO_V1" or "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"; anything else is a checkpoint URI
TORCHVISION_WEIGHTS = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")
UNSAFE_GLOBAL = re.compile(
    r"Unsupported global: GLOBAL ([\w.]+)"
)  # named in torch.load's weights_only refusal


@dataclass(frozen=True)
class WeightsInfo:
    """``--weights`` resolved on the driver: small and picklable, so every actor loads the same thing.

    ``source`` is ``torchvision`` (``uri`` is the weights enum's full name), ``checkpoint`` (``uri``
    is any fsspec URI) or ``none`` (random initialisation, seeded, for demos and tests).
    ``categories[i]`` names label ``i``; index 0 is the background.
    """

    model: str
    source: str
    uri: str
    identity: str
    categories: tuple[str, ...]
    num_keypoints: int | None = None
    min_size: int | None = None  # the resize a checkpoint was trained for (None: the model's default)
    max_size: int | None = None


@dataclass(frozen=True)
class BackboneTraining:
    """How a model's backbone trains, as torchvision's detection builders decide it.

    From pretrained weights (``maskrcnn_resnet50_fpn(weights=...)``): the ResNet trunk's BatchNorm layers are
    ``FrozenBatchNorm2d`` (their statistics and affine parameters stay those of the weights: a few images
    per GPU would make them noise) and only the last ``trainable_layers`` of its stages train
    (:data:`~batchseg.inference.registry.RESNET_STAGES`, counted from layer4; maskrcnn_small's trunk ends at
    layer3, so the same stages train and 1 trains none of it). From scratch: every layer and every BatchNorm
    trains, synchronised across the workers (``SyncBatchNorm``, GPUs only) when ``sync_batchnorm``. The
    FPN and the heads always train. torchvision's v2 builders keep a plain BatchNorm in the trunk, whose
    statistics then move in the frozen stages too; here the trunk's BatchNorm is frozen in every model.
    """

    frozen_batchnorm: bool = False
    trainable_layers: int = len(RESNET_STAGES)
    sync_batchnorm: bool = False

    @classmethod
    def for_weights(
        cls, weights: WeightsInfo, trainable_layers: int | None = None, sync_batchnorm: bool = False
    ) -> BackboneTraining:
        """Frozen BatchNorm and ``trainable_layers`` (default 3) from pretrained ``weights``; from
        scratch (``--weights none``), everything trains."""
        if weights.source == "none":
            return cls(sync_batchnorm=sync_batchnorm)
        layers = TRAINABLE_BACKBONE_LAYERS if trainable_layers is None else trainable_layers
        return cls(frozen_batchnorm=True, trainable_layers=layers)

    def record(self) -> dict[str, Any]:
        """What a checkpoint and ``model.pt`` say of it (``"backbone"``)."""
        return asdict(self)


def freeze_backbone(body: torch.nn.Module, trainable_layers: int) -> None:
    """A ResNet trunk (``model.backbone.body``) made as torchvision builds it for fine-tuning: every
    ``BatchNorm2d`` replaced by a ``FrozenBatchNorm2d`` holding the same values, and the parameters of all
    but the last ``trainable_layers`` stages frozen (torchvision's ``_resnet_fpn_extractor``; its bn1 at 5
    is moot here, a frozen BatchNorm having no parameters)."""
    _freeze_batchnorm(body)
    training = RESNET_STAGES[:trainable_layers]
    for name, parameter in body.named_parameters():
        if not name.startswith(training):
            parameter.requires_grad_(False)


@torch.no_grad()
def _freeze_batchnorm(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer))
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


class ClampedTransform(GeneralizedRCNNTransform):
    """torchvision's normalise, resize and batching, but no side resized to under one pixel.

    torchvision scales the short side to ``min_size`` unless the long side would pass ``max_size``; then the
    scale is ``max_size / long``, and the short side of a 1 x 10000 image (or 4 x 3000 at the shapes
    model's 256) rounds down to 0 pixels, which ``interpolate`` refuses. Such an image is resized with that
    scale and its short side kept at one pixel; boxes (and targets) map between the image and its resized
    size per axis as usual. Every other image takes torchvision's own resize.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        height, width = image.shape[-2:]
        # Only where the long side caps the scale can the short side fall under a pixel; whatever min_size
        # is drawn in training, that scale is then max_size / long.
        scale = self.max_size / max(height, width)
        if (
            self.fixed_size is not None
            or (self.training and self._skip_resize)
            or math.floor(min(height, width) * scale) >= 1
        ):
            return super().resize(image, target)
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        resized, target = _resize_image_and_masks(image, self.min_size[-1], self.max_size, target, size)
        if target is not None:  # as torchvision's resize does after its own
            new = list(resized.shape[-2:])
            target["boxes"] = resize_boxes(target["boxes"], [height, width], new)
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], [height, width], new)
        return resized, target


def maskrcnn_small(num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    """A Mask R-CNN small enough to learn the shapes set on a CPU in minutes (about 4M parameters).

    ResNet-18 up to layer3 (stride 16) with trainable BatchNorm, a 64-channel FPN (P2-P4 plus a pooled
    level), anchors of 8 to 128 pixels, a 256-wide box head, a 64-channel mask head and 64 sampled RoIs per
    image in training. Its resize (for images of about 128 pixels) is in its registry entry.
    """
    trunk = resnet18(weights=None)
    backbone = BackboneWithFPN(
        trunk,
        {"layer1": "0", "layer2": "1", "layer3": "2"},
        [64, 128, 256],
        64,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(
        sizes=((8, 12), (16, 24), (32, 48), (64, 128)), aspect_ratios=((0.5, 1.0, 2.0),) * 4
    )
    levels = ["0", "1", "2"]
    options: dict[str, Any] = {
        "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 250,
    }
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(64, 6),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(64 * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(64, (64, 64, 64, 64), 1),
        mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        **(options | kwargs),
    )


def check_model(name: str) -> str:
    return model_spec(name).name


def coco_categories(model: str) -> tuple[str, ...]:
    """The category names of the model's torchvision weights (COCO's 91, or person for keypoints)."""
    return tuple(get_model_weights(model_spec(model).categories_from).DEFAULT.meta["categories"])


def resolve_weights(
    weights: str, model: str | None = None, storage_options: dict[str, Any] | None = None
) -> WeightsInfo:
    """Turn ``--weights`` (``DEFAULT``, a torchvision enum name, ``none``, or a checkpoint URI) into a
    :class:`WeightsInfo`, failing early with one clear message if they cannot be had."""
    if weights.lower() == "none":
        name = check_model(model or DEFAULT_MODEL)
        categories = coco_categories(name)
        return WeightsInfo(name, "none", "", f"none(seed={RANDOM_SEED})", categories, _keypoints(name, None))
    if TORCHVISION_WEIGHTS.fullmatch(weights) and not os.path.exists(weights):
        return _resolve_torchvision(weights, check_model(model or DEFAULT_MODEL))
    return _resolve_checkpoint(weights, model, storage_options)


def _keypoints(model: str, state: dict[str, torch.Tensor] | None) -> int | None:
    default = model_spec(model).keypoints
    if default is None:
        return None
    key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    return int(state[key].shape[1]) if state and key in state else default


def _resolve_torchvision(weights: str, model: str) -> WeightsInfo:
    if not model_spec(model).pretrained:
        raise BatchsegError(
            f"{model} has no pretrained weights: train it with batchseg train, or use --weights none"
        )
    try:
        enum = (
            get_model_weights(model).DEFAULT
            if weights == "DEFAULT"
            else get_weight(_full_enum_name(weights, model))
        )
    except (ValueError, KeyError, AttributeError) as e:
        raise BatchsegError(f"{weights!r} is not a torchvision weights name for {model}") from e
    if get_model_weights(model) is not type(enum):
        raise BatchsegError(f"weights {enum} do not belong to model {model}")
    _ensure_downloaded(enum.url)
    full = f"{type(enum).__name__}.{enum.name}"
    return WeightsInfo(
        model,
        "torchvision",
        full,
        f"torchvision:{full}",
        tuple(enum.meta["categories"]),
        _keypoints(model, None),
    )


def _full_enum_name(weights: str, model: str) -> str:
    return weights if "." in weights else f"{get_model_weights(model).__name__}.{weights}"


def _ensure_downloaded(url: str) -> None:
    """Fetch torchvision weights into the torch hub cache now, on the driver, so an offline machine fails
    before any work starts rather than in every actor."""
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.exists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(url, target, progress=False)
    except Exception as e:
        raise BatchsegError(
            f"cannot download {url} ({type(e).__name__}: {e}). Offline, either copy that file to {target} "
            "or pass --weights PATH_OR_URI of a checkpoint (or --weights none for random weights)"
        ) from e
    finally:
        socket.setdefaulttimeout(previous)


def read_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The raw bytes of a checkpoint and its contents, loaded with ``weights_only=True`` (no pickled code).
    A folder (a training run, or one of its checkpoints) means the ``model.pt`` inside it."""
    with job_errors(f"cannot read weights {uri}"):
        fs, path = storage.filesystem(uri, storage_options)
        if retries.retrying(lambda: fs.isdir(path), f"reading {uri}"):
            path = storage.join(path, "model.pt")
        try:
            data = retries.retrying(lambda: fs.cat_file(path), f"reading {uri}")
        except FileNotFoundError as e:
            raise BatchsegError(f"weights {uri} do not exist") from e
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise BatchsegError(
            f"{uri} is not a PyTorch checkpoint ({len(data):,} bytes, not written by torch.save)"
        )
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in message:
            # torch's refusal is seven lines urging weights_only=False; --verbose still shows them.
            refused = UNSAFE_GLOBAL.search(message)
            what = f"a pickled {refused[1]}" if refused else "pickled objects"
            raise BatchsegError(
                f"{uri} is not a plain weights file: it holds {what}, refused for safety (batchseg loads "
                "weights with weights_only=True). If you trust it, save its weights alone: "
                "torch.save(torch.load(PATH, weights_only=False).state_dict(), NEW_PATH) for a pickled "
                "model, or the state_dict it holds"
            ) from e
        first_line = message.strip().split("\n")[0]
        raise BatchsegError(
            f"{uri} is not a PyTorch checkpoint that loads safely: {type(e).__name__}: {first_line}"
        ) from e
    if not isinstance(content, dict):
        raise BatchsegError(
            f"{uri} holds a {type(content).__name__}, not a state_dict or batchseg checkpoint"
        )
    return data, content


def split_checkpoint(content: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata): batchseg's training checkpoints keep the weights under ``model``
    beside ``model_name`` and ``categories``; anything else is taken as a plain state_dict."""
    if isinstance(content.get("model"), dict):
        return content["model"], content
    return content, {}


def _resolve_checkpoint(uri: str, model: str | None, storage_options: dict[str, Any] | None) -> WeightsInfo:
    uri = uri if "://" in uri else os.path.abspath(uri)
    data, content = read_checkpoint(uri, storage_options)
    state, meta = split_checkpoint(content)
    saved_model = meta.get("model_name")
    if model and saved_model and model != saved_model:
        raise BatchsegError(f"checkpoint {uri} holds a {saved_model} model, not {model}")
    name = check_model(model or saved_model or DEFAULT_MODEL)
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise BatchsegError(f"checkpoint {uri} has no {key}: not weights for {name}")
    num_classes = int(state[key].shape[0])
    categories = tuple(meta.get("categories") or ())
    if not categories:
        coco = coco_categories(name)
        categories = (
            coco
            if len(coco) == num_classes
            else ("__background__", *tuple(f"class_{i}" for i in range(1, num_classes)))
        )
    if len(categories) != num_classes:
        raise BatchsegError(f"checkpoint {uri} names {len(categories)} categories for {num_classes} classes")
    info = WeightsInfo(
        name,
        "checkpoint",
        uri,
        "sha256:" + hashlib.sha256(data).hexdigest()[:16],
        categories,
        _keypoints(name, state),
        _size(meta.get("min_size")),
        _size(meta.get("max_size")),
    )
    build_model(info, state_dict=state)  # a mismatch fails here, on the driver, not in every actor
    return info


def _size(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None


def load_state_dict(
    info: WeightsInfo, storage_options: dict[str, Any] | None = None
) -> dict[str, torch.Tensor] | None:
    if info.source == "torchvision":
        return get_weight(info.uri).get_state_dict(progress=False, check_hash=True)
    if info.source == "checkpoint":
        return split_checkpoint(read_checkpoint(info.uri, storage_options)[1])[0]
    return None


def build_model(
    info: WeightsInfo,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    backbone: BackboneTraining | None = None,
    **options: Any,
) -> torch.nn.Module:
    """The model for ``info`` in eval mode, with ``state_dict`` loaded (random weights, seeded, when None).
    ``options`` go to the model's constructor (``min_size``, ``box_score_thresh``...) over the registry's
    resize. ``backbone`` makes it the model to train (:class:`BackboneTraining`); without it every
    BatchNorm is a plain one, which in eval mode computes what a frozen one does: a fine-tuned
    ``model.pt`` loads for ``segment`` as any other."""
    spec = model_spec(info.model)
    kwargs: dict[str, Any] = {
        "num_classes": len(info.categories),
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        **options,
    }
    if info.num_keypoints is not None:
        kwargs["num_keypoints"] = info.num_keypoints
    torch.manual_seed(RANDOM_SEED)
    model = _builder(spec)(**kwargs)
    model.transform.__class__ = ClampedTransform  # the same settings; a resize that keeps every side
    if backbone is not None and backbone.frozen_batchnorm:  # before loading: the weights' statistics
        trunk: Any = model.backbone
        freeze_backbone(trunk.body, backbone.trainable_layers)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # Pretrained torchvision weights and fine-tuned models come from FrozenBatchNorm2d, which has no
        # batch counter.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise BatchsegError(
                f"weights do not fit {info.model}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
    if backbone is not None and backbone.sync_batchnorm:  # the same state_dict keys as BatchNorm's
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.eval()


def _builder(spec: ModelSpec) -> Callable[..., torch.nn.Module]:
    if spec.builder == TORCHVISION:
        return functools.partial(get_model, spec.name, weights=None, weights_backbone=None)
    module, _, function = spec.builder.partition(":")
    builder: Callable[..., torch.nn.Module] = getattr(importlib.import_module(module), function)
    return builder
