#!/usr/bin/env bash
# Training speed on one GPU, a few minutes: images/s for maskrcnn_resnet50_fpn v1 and v2 at COCO sizes with
# AMP, fed by batchseg's loader and with batches already on the device, beside NVIDIA's and Detectron2's
# published rates per GPU (bench/train_gpu.py says what is measured).
# Runs from the repository root with the machine's own python3 (PyTorch, torchvision, Pillow, fsspec): no
# Ray. pycocotools (the masks) is not in the lent machine's image: carry its wheel in .whl (see the device
# README) and it is installed here first.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! python3 -c "import pycocotools" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 bench/train_gpu.py "$@"
