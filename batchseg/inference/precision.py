"""Mixed precision, one policy for ``segment`` and ``train``: what ``--precision`` means on a device, and a
detection model whose boxes stay float32 under autocast."""

from __future__ import annotations

from typing import Any

import torch

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what ``--precision`` (one of
    :data:`batchseg.inference.registry.PRECISIONS`) means on ``device``. ``auto`` is bf16 autocast on a GPU
    that computes in bf16 natively (Ampere and later), fp16 on an older one (where torch would emulate
    bf16, slowly), fp32 on the CPU; a named precision is itself."""
    if precision != "auto":
        return precision
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``; None for fp32 (no autocast)."""
    return AUTOCAST_DTYPES[resolve_precision(precision, device)]


def keep_boxes_float32(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a torchvision R-CNN: ``rpn``, ``roi_heads``) made to keep every box in float32 under
    autocast, as detectron2 does; returns it. Applying it again changes nothing.

    torchvision computes boxes in the dtype of the tensors they come from: under bf16 autocast the anchors
    (made in the feature maps' dtype) and the regression heads' outputs are bf16, so every proposal and
    detection would be a bf16 number (on a 4-pixel grid from 512 to 1024 pixels). Here the anchors are made
    from float32 stand-ins of the feature maps, and the RPN head's and the box predictor's outputs are cast
    to float32: the deltas are decoded, clipped, filtered, suppressed and resized in float32 (in training,
    the regression targets and losses too), while the heavy layers still run in the autocast dtype."""
    if getattr(model, "_boxes_float32", False):
        return model
    rpn: Any = model.rpn
    rpn.anchor_generator.register_forward_pre_hook(_float32_feature_shapes)
    rpn.head.register_forward_hook(_float32_outputs)
    roi_heads: Any = model.roi_heads
    roi_heads.box_predictor.register_forward_hook(_float32_outputs)
    model._boxes_float32 = True  # type: ignore[assignment]
    return model


def _float32_feature_shapes(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``AnchorGenerator(images, feature_maps)`` reads only the maps' shapes, dtype and device: it is given
    float32 maps of the same shapes that hold no memory (one element, expanded)."""
    images, features = args
    return images, [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in features]


def _float32_outputs(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """A head's outputs (tensors, or tuples and lists of them) as float32."""
    if isinstance(output, torch.Tensor):
        return output.float()
    return type(output)(_float32_outputs(module, args, o) for o in output)
