"""Mask R-CNN in plain PyTorch + torchvision ops. No Ray, no Arrow; fsspec only for remote URIs."""

from maskrcnn.config import MaskRCNNConfig
from maskrcnn.model import MaskRCNN

__all__ = ["MaskRCNN", "MaskRCNNConfig"]
__version__ = "0.1.0"
