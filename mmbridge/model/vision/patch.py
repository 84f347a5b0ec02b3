"""No vision encoder at all: raw pixel patches as the features (Fuyu / OtterHD).

Fuyu-8B (Adept, 2023) and OtterHD (Li et al. 2023, "OtterHD: A High-Resolution Multi-modality Model",
arXiv 2311.04219) feed the decoder the image's own pixels: the image is cut into ``p × p`` patches
(``p = 30``), each patch is flattened, and one linear layer (the bridge: ``mlp`` of depth 1) maps it
to the LLM width. :class:`PatchEncoder` is that cutting step as a vision encoder with no parameters:

* ``[n, 3, H, W]`` → ``[n, (H/p)·(W/p), 3·p·p]``: patches in row-major order, each flattened
  row by row, pixel by pixel, with the three channels innermost — exactly the order of
  transformers' ``FuyuImageProcessor.patchify_image`` (``unfold`` on height, then width, then the
  channel axis moved last), so ``vision_embed_tokens`` weights apply unchanged;
* ``[n, N, 3·p·p]`` (or ``[N_total, 3·p·p]``), tensors already patchified by transformers' Fuyu
  processor, pass through unchanged.

The transform normalises as Fuyu's image processor does (rescale 1/255, mean 0.5, std 0.5, bilinear
resizing); ``image_size`` is the side of the square input used without a high-resolution strategy
(FuyuConfig's ``image_size`` is 300). Any size whose sides are multiples of ``patch_size`` is taken;
the ``native`` high-resolution strategy pads images to such sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder
from mmbridge.model.vision.transform import ImageTransform


@dataclass
class PatchEncoderConfig:
    """``patch_size`` pixels per patch side (Fuyu: 30); the transform's square ``image_size``, ``resample``
    filter, ``rescale`` factor and per-channel ``mean``/``std`` (Fuyu's image processor: 1/255, 0.5, 0.5)."""

    type: str = "patch"
    patch_size: int = 30
    image_size: int = 300
    resample: str = "bilinear"
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch encoder patch_size must be >= 1, got {self.patch_size}")
        if self.image_size < self.patch_size or self.image_size % self.patch_size:
            raise ValueError(f"patch encoder image_size must be a positive multiple of patch_size {self.patch_size}, "
                             f"got {self.image_size}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"patch encoder {name} needs 3 values (R, G, B), got {getattr(self, name)}")


class PatchEncoder(VisionEncoder):
    """Pixels → flattened ``p × p`` patches in Fuyu's order; no parameters (see the module docstring)."""

    def __init__(self, config: PatchEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = int(config.patch_size)
        self.feature_dim = 3 * self.patch_size * self.patch_size
        self.transform = ImageTransform(size=(config.image_size, config.image_size), resize="exact",
                                        resample=config.resample, rescale=config.rescale,
                                        mean=tuple(config.mean), std=tuple(config.std))

    def num_tokens(self) -> int:
        """Patches of an ``image_size`` square input."""
        rows, cols = self.feature_grid(*self.transform.output_size)
        return rows * cols

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches of a ``height × width`` input."""
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [n, 3, H, W] -> [n, (H/p)*(W/p), 3*p*p]
        if pixel_values.dim() in (2, 3) and pixel_values.shape[-1] == self.feature_dim:
            return pixel_values  # already patchified (transformers' Fuyu tensors)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"patch encoder takes pixels [n, 3, H, W] or patches [n, N, {self.feature_dim}] "
                             f"(3·{self.patch_size}²), got a tensor of shape {tuple(pixel_values.shape)}")
        count, channels, height, width = pixel_values.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"patch encoder: input sides must be multiples of patch_size {patch}, got "
                             f"{height}x{width} (the 'native' high-resolution strategy pads to them)")
        rows, cols = height // patch, width // patch
        patches = pixel_values.reshape(count, channels, rows, patch, cols, patch)  # [n, C, R, p, Q, p]
        patches = patches.permute(0, 2, 4, 3, 5, 1)  # [n, R, Q, p (y), p (x), C]: Fuyu's order, channels last
        return patches.reshape(count, rows * cols, patch * patch * channels)  # [n, R*Q, 3*p*p]

    def export_config(self) -> PatchEncoderConfig:
        return self.config


@VISION_ENCODERS.register("patch", PatchEncoderConfig)
def build_patch(cfg: PatchEncoderConfig) -> PatchEncoder:
    return PatchEncoder(cfg).eval()
