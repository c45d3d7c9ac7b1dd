"""The model stood in for benchmarks of everything around it: ``Predictor.forward`` returning fixed detections."""

from __future__ import annotations

from typing import Any


def stand_in(instances: int, inset: int = 0) -> Any:
    """The worker setup hook: ``Predictor.forward`` gives ``instances`` fixed detections per image, each
    mask filling its box (a trained head on solid objects), without running the model. The first box's
    corner is at ``(inset, inset)``: at 0 it touches the image's top-left edges (on a tile: an object cut
    by the tile's edge, a piece to stitch); a few pixels in, every box lies inside."""

    def setup() -> None:
        import torch

        from batchseg.inference.predictor import Predictor

        def forward(self: Any, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            out = []
            for image in images:
                h, w = int(image.shape[-2]), int(image.shape[-1])
                k = torch.arange(instances, dtype=torch.float32)
                x0, y0 = inset + (k * 7) % max(1, w // 2), inset + (k * 5) % max(1, h // 2)
                boxes = torch.stack([x0, y0, (x0 + w / 3).clamp(max=w), (y0 + h / 3).clamp(max=h)], dim=1)
                out.append(
                    {
                        "boxes": boxes,
                        "scores": torch.linspace(0.99, 0.6, instances),
                        "labels": (k % 3 + 1).to(torch.int64),
                        "masks": torch.ones((instances, 1, 28, 28)),
                    }
                )
            return out

        Predictor.forward = forward  # type: ignore[method-assign]

    return setup
