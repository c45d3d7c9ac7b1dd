"""Where the GPU pipeline's time goes per batch: the model (synchronised), then each step of the mask path.

Usage: python bench/gpu_masks.py [--images 40] [--model maskrcnn_resnet50_fpn_v2] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections import defaultdict

import torch

from batchseg.inference.models import resolve_weights
from batchseg.inference.paste import crop_columns, rle_strings, run_lengths
from batchseg.inference.predictor import Predictor
from batchseg.io.images import decode_image
from batchseg.train.synth import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--model", default="maskrcnn_resnet50_fpn_v2")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    predictor = Predictor.from_weights(
        resolve_weights("none", args.model),
        score_threshold=0.9,
        max_instances=20,
        device=device,
        precision="bf16" if device == "cuda" else "fp32",
    )
    with tempfile.TemporaryDirectory() as tmp:
        uris = write_dataset(tmp, args.images, seed=0, size=560).uris
        images = [
            torch.from_numpy(decode_image(pathlib.Path(u).read_bytes())).permute(2, 0, 1).to(device)
            for u in uris
        ]
    spent: dict[str, float] = defaultdict(float)
    instances = 0

    def tick(name: str, start: float) -> float:
        sync()
        now = time.perf_counter()
        spent[name] += now - start
        return now

    dtype = torch.bfloat16 if device == "cuda" else None
    with torch.inference_mode():
        for k in range(0, len(images), args.batch_size):
            t = time.perf_counter()
            tensors = [im.float().div(255) for im in images[k : k + args.batch_size]]
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                outputs = predictor.forward(tensors)
            t = tick("model forward (synchronised)", t)
            instances += sum(len(out["masks"]) for out in outputs)
            crops = crop_columns(
                [out["masks"].float() for out in outputs],
                [out["boxes"] for out in outputs],
                [(int(im.shape[-2]), int(im.shape[-1])) for im in tensors],
            )
            t = tick("crop_columns: boxes to host, resize, threshold (device)", t)
            runs = run_lengths(crops)
            t = tick("run_lengths: on the device, one copy per batch", t)
            rle_strings(runs)
            t = tick("rle_strings: COCO strings (numpy, host)", t)
    total = sum(spent.values())
    print(
        f"{args.model} on {device}: {len(images)} images, {instances / len(images):.1f} instances/image, "
        f"{len(images) / total:.1f} img/s for these steps"
    )
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<56} {1000 * seconds / len(images):7.2f} ms/image  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
