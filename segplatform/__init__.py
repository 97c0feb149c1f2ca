"""segplatform: distributed training, tuning, tracking and serving of segmentation models on Ray."""

__version__ = "0.1.0"
