"""Vision encoders: HF CLIP/SigLIP/ViT towers, the bundled EfficientNet-Lite0, any grid-returning module, raw pixel
patches (Fuyu)."""

from mmbridge.model.vision import efficientnet  # noqa: F401  (registers "efficientnet_lite0")
from mmbridge.model.vision import hf  # noqa: F401  (registers "hf")
from mmbridge.model.vision import module  # noqa: F401  (registers "module")
from mmbridge.model.vision import patch  # noqa: F401  (registers "patch")
from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder, build_vision
from mmbridge.model.vision.module import ModuleVisionEncoder, wrap_module
from mmbridge.model.vision.transform import ImageTransform

__all__ = ["VISION_ENCODERS", "VisionEncoder", "build_vision", "ImageTransform", "ModuleVisionEncoder",
           "wrap_module"]
