"""LLaVA-UHD's image modularization (Xu, Yao, Guo et al., arXiv 2403.11703, "LLaVA-UHD: an LMM Perceiving Any
Aspect Ratio and High-Resolution Images"; ECCV 2024).

An image of ``H_I × W_I`` pixels is cut into variable-sized slices whose shape stays close to the encoder's, and
every slice is encoded at (about) the encoder's area in its own aspect ratio, with the ViT's position embeddings
interpolated in 2D (:class:`~mmbridge.model.vision.hf.HFVisionEncoder` does it; a CNN such as EfficientNet needs
nothing). The rule, as in the paper (Sec. 3.1) and its reference code (``slice_process.py``, 2024-07 release):

* the ideal number of slices is ``N = min(ceil(H_I·W_I / (H_v·W_v)), max_slices)`` (``H_v × W_v``: the encoder's
  native input; ``max_slices`` 6 in the paper);
* ``N ≤ 1`` (an image no larger than the encoder's input): no slices, only the overview;
* otherwise the partitions ``m × n`` (columns × rows) of ``N - 1``, ``N`` and ``N + 1`` slices (counts of 1 and
  above ``max_slices`` left out) are scored by ``|log((W_I / m) / (H_I / n)) - log(W_v / H_v)|`` — how far a
  slice's aspect ratio is from the encoder's, in log — and the lowest wins (the first on ties, counts ascending,
  then columns ascending);
* each slice (nominally ``⌊H_I / n⌋ × ⌊W_I / m⌋``) and the overview (the whole image) are resized with their
  aspect ratio kept to an area of about ``H_v·W_v``, both sides rounded down to a multiple of the encoder's patch
  (``multiple``; at least one patch), so the encoder's grid covers them exactly.

A SHARED compression layer — the model's bridge — turns every crop into its tokens (the perceiver resampler keeps
``num_latents`` per crop whatever the crop's grid, as the paper's 64-query resampler; ``qwen_resampler`` gets each
crop's own feature grid for its 2D positions; an MLP keeps every feature). The spatial schema puts a literal ``","``
after each slice of a row but the last, and ``"\\n"`` after the last slice of every row; the overview's tokens
follow the slices, as the reference code's ``prepare_inputs_labels_for_multimodal`` orders them
(``overview_first`` puts them before). Separators are ordinary text tokens of the LLM's tokenizer.

The paper's efficiency claim (arXiv v1: 672×1088 "using only 94% inference computation" of LLaVA-1.5 at 336 px)
counts the whole model: the encoder runs about 7 times as often, but the LLM reads ``7 × 64`` compressed tokens
instead of 576. :func:`plan_slices` gives the crop sizes such an accounting needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch import nn

from mmbridge.model.highres.base import (HIGHRES, VISUAL, Crop, HighResStrategy, ImageLayout, single_token_id,
                                         split_grid)
from mmbridge.model.vision.transform import resample_filter


@dataclass
class UHDConfig:
    """``max_slices``: most slices per image (6 in the paper); ``multiple``: one cell of the encoder's feature grid in
    pixels (None: the encoder's patch or stride, read from its feature grid); crop sides are multiples of it times
    the bridge's ``grid_divisor``; ``column_separator`` / ``row_separator``: the text
    after a slice inside a row / at the end of a row (each must be one token of the LLM's tokenizer);
    ``overview_first``: the overview's tokens before the slices' (the reference code puts them after)."""

    type: str = "uhd"
    max_slices: int = 6
    multiple: int | None = None
    column_separator: str = ","
    row_separator: str = "\n"
    overview_first: bool = False

    def __post_init__(self) -> None:
        if self.max_slices < 1:
            raise ValueError(f"uhd max_slices must be >= 1, got {self.max_slices}")
        if self.multiple is not None and self.multiple < 1:
            raise ValueError(f"uhd multiple must be >= 1 (pixels), got {self.multiple}")


@dataclass(frozen=True)
class SlicePlan:
    """Where one image goes: ``grid`` (rows, columns) of slices, or None for the overview alone; each slice's
    and the overview's encoder input (height, width)."""

    grid: tuple[int, int] | None
    slice_size: tuple[int, int] | None
    overview_size: tuple[int, int]

    @property
    def slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]


def ideal_slices(image_size: tuple[int, int], encoder_size: tuple[int, int], max_slices: int) -> int:
    """``N = min(ceil(image area / encoder area), max_slices)``."""
    height, width = image_size
    return min(math.ceil(height * width / (encoder_size[0] * encoder_size[1])), max_slices)


def choose_partition(image_size: tuple[int, int], encoder_size: tuple[int, int],
                     max_slices: int) -> tuple[int, int] | None:
    """(rows, columns) of the best partition of an image of (height, width), or None when ``N ≤ 1``."""
    count = ideal_slices(image_size, encoder_size, max_slices)
    if count <= 1:
        return None
    height, width = image_size
    log_image = math.log(width / height)
    log_encoder = math.log(encoder_size[1] / encoder_size[0])
    best, best_error = None, math.inf
    for slices in (count - 1, count, count + 1):
        if slices == 1 or slices > max_slices:
            continue
        for cols in range(1, slices + 1):
            if slices % cols:
                continue
            rows = slices // cols
            # log of the slice's aspect ratio (W_I / m) / (H_I / n) against the encoder's
            error = abs(log_image - math.log(cols / rows) - log_encoder)
            if error < best_error:
                best, best_error = (rows, cols), error
    return best


def floor_multiple(length: int, multiple: int) -> int:
    """``length`` rounded down to a multiple of ``multiple``, at least ``multiple``."""
    return max(length // multiple * multiple, multiple)


def fit_area(size: tuple[int, int], encoder_size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width) of a region of ``size`` resized to about the encoder's area with its aspect ratio kept, each
    side rounded down to a multiple of ``multiple``."""
    height, width = size
    ratio = width / height
    scaled_height = int(math.sqrt(encoder_size[0] * encoder_size[1]) / math.sqrt(ratio))
    scaled_width = int(scaled_height * ratio)
    return floor_multiple(scaled_height, multiple), floor_multiple(scaled_width, multiple)


def plan_slices(image_size: tuple[int, int], encoder_size: tuple[int, int], multiple: int,
                max_slices: int = 6) -> SlicePlan:
    """The partition and crop sizes of an image of (height, width) for an encoder of ``encoder_size``."""
    overview = fit_area(image_size, encoder_size, multiple)
    grid = choose_partition(image_size, encoder_size, max_slices)
    if grid is None:
        return SlicePlan(None, None, overview)
    rows, cols = grid
    nominal = (max(image_size[0] // rows, 1), max(image_size[1] // cols, 1))  # one slice of the original image
    return SlicePlan(grid, fit_area(nominal, encoder_size, multiple), overview)


class UHD(HighResStrategy):
    """LLaVA-UHD's slicing and spatial schema; see the module docstring."""

    cfg: UHDConfig

    def attach(self, vision: nn.Module, bridge: nn.Module, tokenizer: Any, hidden_size: int) -> None:
        super().attach(vision, bridge, tokenizer, hidden_size)
        cell = self.cfg.multiple or self.encoder_stride()
        rows, cols = vision.feature_grid(2 * cell, 3 * cell)
        if (rows, cols) != (2, 3):
            raise ValueError(f"uhd multiple {cell} px must be one cell of the encoder's feature grid, but a "
                             f"{2 * cell}x{3 * cell} input gives a {rows}x{cols} grid, not 2x3")
        self.multiple = cell * bridge.grid_divisor()  # crop sides: whole cells, in blocks the bridge can fold
        self.column_id = single_token_id(tokenizer, self.cfg.column_separator, "uhd column_separator")
        self.row_id = single_token_id(tokenizer, self.cfg.row_separator, "uhd row_separator")

    def encoder_stride(self) -> int:
        """Pixels per feature-grid cell at the encoder's native size (the ViT patch, a CNN's stride)."""
        height, width = self.encoder_size
        rows, cols = self.vision.feature_grid(height, width)  # type: ignore[union-attr]
        if height % rows or width % cols or height // rows != width // cols:
            raise ValueError(f"uhd cannot read a patch size from a {rows}x{cols} feature grid of a {height}x{width} "
                             f"input; set the uhd 'multiple' (pixels per grid cell)")
        return height // rows

    def plan(self, image_size: tuple[int, int]) -> ImageLayout:
        sliced = plan_slices(image_size, self.encoder_size, self.multiple, self.cfg.max_slices)
        overview = Crop(sliced.overview_size, 0, overview=True)
        overview_tokens = [VISUAL] * self.crop_tokens(overview)
        if sliced.grid is None:
            return ImageLayout(image_size, [overview], overview_tokens, grid=(1, 1), extra={"plan": sliced})
        rows, cols = sliced.grid
        slices = [Crop(sliced.slice_size, 1 + index) for index in range(rows * cols)]  # reading order
        per_slice = [VISUAL] * self.crop_tokens(slices[0])
        body: list[int] = []
        for _ in range(rows):
            for col in range(cols):
                body += per_slice + [self.column_id if col < cols - 1 else self.row_id]
        if self.cfg.overview_first:
            return ImageLayout(image_size, [overview] + slices, overview_tokens + body, sliced.grid, {"plan": sliced})
        return ImageLayout(image_size, slices + [overview], body + overview_tokens, sliced.grid, {"plan": sliced})

    def crop(self, image: Image.Image) -> list[Image.Image]:
        sliced: SlicePlan = self.layout((image.height, image.width)).extra["plan"]
        resample = resample_filter(self.vision.transform.resample)  # type: ignore[union-attr]
        image = image.convert("RGB")
        overview_height, overview_width = sliced.overview_size
        overview = image.resize((overview_width, overview_height), resample)
        if sliced.grid is None:
            return [overview]
        rows, cols = sliced.grid
        slice_height, slice_width = sliced.slice_size  # type: ignore[misc]
        refined = image.resize((cols * slice_width, rows * slice_height), resample)  # [rows·h, cols·w]
        slices = split_grid(refined, rows, cols)
        return [overview] + slices if self.cfg.overview_first else slices + [overview]


@HIGHRES.register("uhd", UHDConfig)
def build_uhd(cfg: UHDConfig) -> UHD:
    return UHD(cfg)
