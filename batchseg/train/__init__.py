"""Training: COCO data, the plain-PyTorch recipe, the synthetic shapes set, and the Ray Train glue (the
only part that imports Ray)."""
