"""Native resolution (Fuyu-8B; OtterHD, Li et al. 2023, arXiv 2311.04219): the image at its own size.

No tiling and no fixed input size: an image is encoded as one crop, itself, scaled down only when it
exceeds ``max_size`` (aspect ratio kept; Fuyu's 1080 × 1920 by default) and padded at the bottom and
right up to multiples of the encoder's stride (the pixels per feature-grid cell: the patch size of
the ``patch`` encoder or of a ViT, 32 for EfficientNet) times the bridge's ``grid_divisor`` (pixel
shuffle's factor, so its blocks tile the grid). Its tokens are the bridge's tokens in
row-major order with a literal ``row_end`` token id after each row (Fuyu's ``|NEWLINE|``), so the
LLM sees the 2-D layout; the merge is the identity.

Fuyu's preprocessing, as transformers' ``FuyuImageProcessor`` and ``FuyuProcessor`` do it:

* scale ``s = min(max_h / h, max_w / w)`` only when ``h > max_h`` or ``w > max_w``; the new sides are
  ``int(h · s)``, ``int(w · s)`` (truncated);
* pad with pixel value 1 (``padding_value=1.0`` is applied to 0–255 pixels before the 1/255 rescale,
  so the padding is near-black, ``(1/255 − 0.5) / 0.5`` after normalisation) — ``pad_colour`` [1, 1, 1];
* patches of 30 px; the token span is ``rows × (cols × |SPEAKER| + |NEWLINE|)``.

With the ``patch`` encoder and a depth-1 ``mlp`` bridge (Fuyu's ``vision_embed_tokens``) this is Fuyu;
with any encoder that reports a feature grid at any multiple of its stride (EfficientNet-Lite0, HF
CLIP/SigLIP towers, which interpolate their position embeddings) it is "native resolution" for that
encoder. The bridge must report where its tokens lie (``token_grid``: MLP, pooling, pixel shuffle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmbridge.model.highres.base import HIGHRES, VISUAL, Crop, HighResStrategy, ImageLayout, single_token_id
from mmbridge.model.vision.transform import resample_filter

FUYU_MAX_SIZE = [1080, 1920]  # FuyuImageProcessor's size (height, width)
FUYU_PAD_COLOUR = [1, 1, 1]  # FuyuImageProcessor's padding_value 1.0, applied to 0–255 pixels


@dataclass
class NativeConfig:
    """``max_size`` [height, width] above which images are scaled down (None: never); ``row_end`` text that
    must be one token of the LLM's tokenizer, written after each row of image tokens (None: no row ends);
    ``pad_colour`` RGB (0–255) of the bottom/right padding; ``stride`` pixels per feature-grid cell (None:
    derived from the encoder's feature grid at its native size)."""

    type: str = "native"
    max_size: list[int] | None = field(default_factory=lambda: list(FUYU_MAX_SIZE))
    row_end: str | None = "\n"
    pad_colour: list[int] = field(default_factory=lambda: list(FUYU_PAD_COLOUR))
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and (len(self.max_size) != 2 or min(self.max_size) < 1):
            raise ValueError(f"native max_size is [height, width] with both >= 1 (or null), got {self.max_size}")
        if len(self.pad_colour) != 3 or not all(0 <= value <= 255 for value in self.pad_colour):
            raise ValueError(f"native pad_colour is [R, G, B] in 0–255, got {self.pad_colour}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"native stride must be >= 1 (or null to derive it), got {self.stride}")
        if self.row_end == "":
            raise ValueError("native row_end must be a non-empty string (one token) or null")


class Native(HighResStrategy):
    """One crop per image at its own (capped) size; see the module docstring."""

    cfg: NativeConfig

    def attach(self, vision: nn.Module, bridge: nn.Module, tokenizer: Any, hidden_size: int) -> None:
        super().attach(vision, bridge, tokenizer, hidden_size)
        self.row_end_id = None if self.cfg.row_end is None else \
            single_token_id(tokenizer, self.cfg.row_end, "native row_end")
        self.stride = int(self.cfg.stride) if self.cfg.stride is not None else encoder_stride(vision)
        self.multiple = self.stride * bridge.grid_divisor()  # pixels a padded side is a multiple of
        self.token_grid((2 * self.multiple, 3 * self.multiple))  # fail early when the tokens have no place

    def scaled_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) after Fuyu's downscaling to fit ``max_size`` (unchanged when it already fits)."""
        height, width = image_size
        if self.cfg.max_size is None:
            return height, width
        max_height, max_width = self.cfg.max_size
        if height <= max_height and width <= max_width:
            return height, width
        scale = min(max_height / height, max_width / width)
        return max(1, int(height * scale)), max(1, int(width * scale))

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``size`` rounded up to multiples of the encoder's stride (times the bridge's grid divisor)."""
        return tuple(math.ceil(side / self.multiple) * self.multiple for side in size)  # type: ignore[return-value]

    def plan(self, image_size: tuple[int, int]) -> ImageLayout:
        scaled = self.scaled_size(image_size)
        padded = self.padded_size(scaled)
        rows, cols = self.token_grid(padded)
        row = [VISUAL] * cols + ([] if self.row_end_id is None else [self.row_end_id])
        return ImageLayout(image_size, [Crop(padded, 0, overview=True)], row * rows,
                           extra={"scaled": scaled, "token_grid": (rows, cols)})

    def crop(self, image: Image.Image) -> list[Image.Image]:
        layout = self.layout((image.height, image.width))
        height, width = layout.extra["scaled"]
        padded_height, padded_width = layout.crops[0].size
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample_filter(self.vision.transform.resample))  # type: ignore
        canvas = Image.new("RGB", (padded_width, padded_height), tuple(self.cfg.pad_colour))
        canvas.paste(image.convert("RGB"), (0, 0))  # padding at the bottom and right, as Fuyu
        return [canvas]

    def merge(self, layout: ImageLayout, tokens: list[torch.Tensor]) -> torch.Tensor:
        return tokens[0]  # [rows * cols, D]: row-major already; row ends are literal ids in the layout


def encoder_stride(vision: nn.Module) -> int:
    """Input pixels per feature-grid cell, read from the encoder's grid at its native size (and checked at a
    2 × 3 cell input)."""
    height, width = vision.transform.output_size  # type: ignore[union-attr]
    rows, cols = vision.feature_grid(height, width)  # type: ignore[operator]
    if rows >= 1 and cols >= 1 and height % rows == 0 and width % cols == 0 and height // rows == width // cols:
        stride = height // rows
        if tuple(vision.feature_grid(2 * stride, 3 * stride)) == (2, 3):  # type: ignore[operator]
            return stride
    raise ValueError(f"native resolution cannot derive the stride of {type(vision).__name__} (a {rows}x{cols} "
                     f"feature grid at {height}x{width} px); set highres.stride to its pixels per grid cell")


@HIGHRES.register("native", NativeConfig)
def build_native(cfg: NativeConfig) -> Native:
    return Native(cfg)
