"""AnyRes (LLaVA-NeXT, Liu et al. 2024-01-30 "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge").

An image is fitted (aspect ratio kept, black padding) into the best of a grid of candidate resolutions,
each a ``rows × cols`` arrangement of encoder-size tiles; every tile is encoded on its own, the tiles'
token grids are stitched into one map, the rows and columns that only saw padding are removed
("unpad"), an ``image_newline`` embedding (a learned vector on the bridge) ends each row, and the
tokens of a global view (the whole image resized to the encoder's size) come first. Token for token
what transformers' ``LlavaNextForConditionalGeneration`` builds (``pack_image_features``), so a
LLaVA-NeXT checkpoint imports exactly (:mod:`mmbridge.interop.llava_next`).

The bridge must report where its tokens lie (``token_grid``: MLP, pooling, pixel shuffle): AnyRes stitches
token grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmbridge.model.highres.base import (HIGHRES, VISUAL, Crop, HighResStrategy, ImageLayout, fit_within,
                                         select_best_resolution, split_grid)
from mmbridge.model.vision.transform import resample_filter

LLAVA_NEXT_GRID = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # LLaVA-NeXT's pinpoints, in tiles (rows, cols)


@dataclass
class AnyResConfig:
    """``grid``: candidate arrangements ``[rows, cols]`` of encoder-size tiles (LLaVA-NeXT's 1×2, 2×1, 2×2, 3×1,
    1×3 by default); ``newline``: a learned ``image_newline`` ends each row of tile tokens; ``unpad``: drop the
    token rows/columns that only saw padding."""

    type: str = "anyres"
    grid: list[list[int]] = field(default_factory=lambda: [list(cell) for cell in LLAVA_NEXT_GRID])
    newline: bool = True
    unpad: bool = True

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("anyres grid needs at least one [rows, cols] candidate")
        for cell in self.grid:
            if len(cell) != 2 or min(cell) < 1:
                raise ValueError(f"anyres grid entries are [rows, cols] with both >= 1, got {cell}")


class AnyRes(HighResStrategy):
    """LLaVA-NeXT's AnyRes; see the module docstring."""

    cfg: AnyResConfig

    def attach(self, vision: nn.Module, bridge: nn.Module, tokenizer: Any, hidden_size: int) -> None:
        super().attach(vision, bridge, tokenizer, hidden_size)
        if self.cfg.newline and not hasattr(bridge, "image_newline"):
            # LLaVA-NeXT's initialisation: N(0, 1/hidden) per entry
            bridge.register_parameter("image_newline", nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size)))
        self.token_grid(self.encoder_size)  # fail early when the bridge's tokens have no place in the image

    def candidates(self) -> list[tuple[int, int]]:
        height, width = self.encoder_size
        return [(rows * height, cols * width) for rows, cols in self.cfg.grid]

    def plan(self, image_size: tuple[int, int]) -> ImageLayout:
        tile = self.encoder_size
        best = select_best_resolution(image_size, self.candidates())
        rows, cols = best[0] // tile[0], best[1] // tile[1]
        token_rows, token_cols = self.token_grid(tile)
        kept_rows, kept_cols = rows * token_rows, cols * token_cols
        cut = (0, 0, 0, 0)
        if self.cfg.unpad:
            cut = unpad_cut(image_size, (kept_rows, kept_cols))
            kept_rows, kept_cols = kept_rows - cut[0] - cut[1], kept_cols - cut[2] - cut[3]
        count = token_rows * token_cols + kept_rows * (kept_cols + int(self.cfg.newline))
        crops = [Crop(tile, 0, overview=True)] + [Crop(tile, 1 + index) for index in range(rows * cols)]
        return ImageLayout(image_size, crops, [VISUAL] * count, grid=(rows, cols),
                           extra={"best": best, "token_grid": (token_rows, token_cols), "cut": cut})

    def crop(self, image: Image.Image) -> list[Image.Image]:
        layout = self.layout((image.height, image.width))
        tile_height, tile_width = self.encoder_size
        best_height, best_width = layout.extra["best"]
        resample = resample_filter(self.vision.transform.resample)  # type: ignore[union-attr]
        image = image.convert("RGB")
        fitted_height, fitted_width = fit_within((image.height, image.width), (best_height, best_width))
        canvas = Image.new("RGB", (best_width, best_height), (0, 0, 0))  # LLaVA-NeXT pads with black
        canvas.paste(image.resize((fitted_width, fitted_height), resample),
                     ((best_width - fitted_width) // 2, (best_height - fitted_height) // 2))
        overview = image.resize((tile_width, tile_height), resample)
        return [overview] + split_grid(canvas, *layout.grid)

    def merge(self, layout: ImageLayout, tokens: list[torch.Tensor]) -> torch.Tensor:
        token_rows, token_cols = layout.extra["token_grid"]
        rows, cols = layout.grid
        tiles = torch.stack(tokens[1:])  # [rows * cols, th * tw, D]
        width = tiles.shape[-1]
        stitched = (tiles.view(rows, cols, token_rows, token_cols, width).permute(0, 2, 1, 3, 4)
                    .reshape(rows * token_rows, cols * token_cols, width))  # [R, C, D]
        top, bottom, left, right = layout.extra["cut"]
        stitched = stitched[top:stitched.shape[0] - bottom, left:stitched.shape[1] - right]
        if self.cfg.newline:
            newline = self.bridge.image_newline.to(stitched.dtype)  # type: ignore[union-attr]
            stitched = torch.cat([stitched, newline.expand(stitched.shape[0], 1, width)], dim=1)
        return torch.cat([tokens[0], stitched.reshape(-1, width)])  # global view first, as LLaVA-NeXT


def unpad_cut(image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """Token rows/columns (top, bottom, left, right) of a ``grid`` that only covered the black padding of an image
    of ``image_size`` fitted into it — LLaVA-NeXT's ``unpad_image`` (same rounding)."""
    height, width = image_size
    grid_height, grid_width = grid
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        pad = (grid_height - new_height) // 2
        return pad, pad, 0, 0
    new_width = int(round(width * (grid_height / height), 7))
    pad = (grid_width - new_width) // 2
    return 0, 0, pad, pad


@HIGHRES.register("anyres", AnyResConfig)
def build_anyres(cfg: AnyResConfig) -> AnyRes:
    return AnyRes(cfg)
