"""batchseg: Mask R-CNN instance segmentation over very large image archives."""

__version__ = "0.1.0"
