"""Vision encoders: HF CLIP/SigLIP/ViT towers, the bundled EfficientNet-Lite0, any grid-returning module."""

from mmbridge.model.vision import hf  # noqa: F401  (registers "hf")
from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder, build_vision
from mmbridge.model.vision.transform import ImageTransform

__all__ = ["VISION_ENCODERS", "VisionEncoder", "build_vision", "ImageTransform"]
