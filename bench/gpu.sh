#!/usr/bin/env bash
# One prepared GPU check, a few minutes on one GPU: raw model loop (fp32, bf16) and end-to-end img/s, then
# the shipped model's bf16 boxes against fp32's.
# Runs from the repository root with the machine's own python3 (PyTorch, torchvision, pyarrow, fsspec,
# Pillow); batchseg's core needs no Ray for this.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu.py "$@"
