"""The model registry: everything batchseg knows about a model, in one ``ModelSpec`` per model.

No torch here, so that the command line lists the models without loading it; the builder is named by
its import path and imported only when a model is built (``models.build_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchseg.errors import BatchsegError

TORCHVISION = "torchvision"
COCO_SCALES = (640, 672, 704, 736, 768, 800)  # torchvision's references: multi-scale training on COCO
# The resize an option may ask for (a shorter side, or the longer side's cap), in pixels: under 32 the
# backbone's stride-32 features are a single cell; over 10,000 a model input is past 100 megapixels.
RESIZE_MIN, RESIZE_MAX = 32, 10_000
# --precision of segment and train; what each means on a device: inference.precision.resolve_precision
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# A ResNet trunk's stages, the last first: fine-tuning trains the first N of them (torchvision's
# trainable_backbone_layers, 0 to 5, default 3: conv1 and layer1 frozen).
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
TRAINABLE_BACKBONE_LAYERS = 3


def resize_problem(sizes: int | tuple[int, ...]) -> str | None:
    """What is wrong with a resize option's sizes (a shorter side, or the longer side's cap), or None."""
    sizes = sizes if isinstance(sizes, tuple) else (sizes,)
    if all(RESIZE_MIN <= s <= RESIZE_MAX for s in sizes):
        return None
    return f"must be from {RESIZE_MIN} to {RESIZE_MAX} pixels, not {','.join(map(str, sizes))}"


def resize_order(min_sizes: tuple[int, ...], max_size: int | None, min_option: str) -> tuple[bool, str]:
    """A resize option pair (``min_option``, ``--max-size``) as an ``(ok, message)`` row: no shorter side
    above the longer side's cap."""
    return (
        max_size is None or max(min_sizes, default=0) <= max_size,
        f"--max-size {max_size} is under {min_option} {','.join(map(str, min_sizes))}: the longer side's cap "
        "must be at least the shorter side",
    )


@dataclass(frozen=True)
class ModelSpec:
    """One detection model batchseg can run (and perhaps train).

    ``builder`` is ``"torchvision"`` (``torchvision.models.get_model(name)``) or ``"module:function"``
    taking torchvision's detection keywords (``num_classes``, ``min_size``, ``box_score_thresh``...).
    ``keypoints`` is the number of keypoints per instance (None: not a keypoint model). ``pretrained``:
    torchvision ships COCO weights for it (``--weights DEFAULT``). Label ``i`` is named by the COCO
    categories of ``categories_from``'s torchvision weights, unless the weights name their own.
    ``min_size``/``max_size`` is the model's resize at inference (shorter side, longer-side cap);
    ``train_sizes`` are the shorter sides drawn per batch in training, the last one used in evaluation.
    """

    name: str
    builder: str = TORCHVISION
    masks: bool = True
    keypoints: int | None = None
    pretrained: bool = True
    categories_from: str = "maskrcnn_resnet50_fpn"
    min_size: int = 800
    max_size: int = 1333
    train_sizes: tuple[int, ...] = COCO_SCALES

    @property
    def trainable(self) -> bool:
        """``batchseg train`` trains instance segmentation: models with a mask head."""
        return self.masks


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("maskrcnn_resnet50_fpn_v2", categories_from="maskrcnn_resnet50_fpn_v2"),
        ModelSpec("maskrcnn_resnet50_fpn"),
        ModelSpec("fasterrcnn_resnet50_fpn_v2", masks=False, categories_from="fasterrcnn_resnet50_fpn_v2"),
        ModelSpec(
            "keypointrcnn_resnet50_fpn",
            masks=False,
            keypoints=17,
            categories_from="keypointrcnn_resnet50_fpn",
        ),
        # Small enough to learn the synthetic shapes on a CPU in minutes; no pretrained weights.
        ModelSpec(
            "maskrcnn_small",
            builder="batchseg.inference.models:maskrcnn_small",
            pretrained=False,
            min_size=128,
            max_size=256,
            train_sizes=(112, 144, 128),
        ),
    )
}
DEFAULT_MODEL = "maskrcnn_resnet50_fpn_v2"
TRAINABLE = tuple(name for name, spec in MODELS.items() if spec.trainable)


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name is a job-level error naming the choices."""
    try:
        return MODELS[name]
    except KeyError as e:
        raise BatchsegError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from e
