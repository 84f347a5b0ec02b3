"""The vision-encoder interface every encoder adapter implements.

A :class:`VisionEncoder` maps ``pixel_values [B, 3, H, W]`` to features
``[B, N, D_v]``, says ``num_tokens`` (N), ``feature_dim`` (D_v) and how the features lie
(:meth:`VisionEncoder.feature_layout`, a :class:`~mmbridge.model.grid.FeatureGrid`), carries the
:class:`ImageTransform` that prepares its input, and can describe itself as a
self-contained config (``export_config``) so a saved model is rebuilt without the
original checkpoint directory.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from mmbridge.model.grid import FeatureGrid
from mmbridge.model.vision.transform import ImageTransform
from mmbridge.registry import Registry

VISION_ENCODERS: Registry["VisionEncoder"] = Registry("vision encoder")


class VisionEncoder(nn.Module, abc.ABC):
    """Base class: subclasses set ``feature_dim`` and ``transform`` and implement ``forward``."""

    feature_dim: int
    transform: ImageTransform

    @abc.abstractmethod
    def num_tokens(self) -> int:
        """Tokens per image for the transform's output size."""

    @abc.abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D_v]
        """Encode ``pixel_values`` into features ``[B, N, D_v]``."""

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the feature grid for an input of ``height × width`` pixels (row-major tokens); encoders
        whose features are not (all) cells of a grid raise a ``ValueError``."""
        raise ValueError(f"{type(self).__name__} has no spatial grid of features (for {height}x{width} inputs)")

    def feature_layout(self, height: int | None = None, width: int | None = None,
                       count: int | None = None) -> FeatureGrid:
        """How the features of one ``height × width`` input lie (default: the transform's size): the grid, after
        tokens without a cell (a kept CLS token), or a plain sequence when the encoder has no grid. ``count``: the
        features an input of that size gave, when known (needed for an encoder without a grid at another size)."""
        native = tuple(self.transform.output_size)
        size = native if height is None else (int(height), int(width))
        total = count if count is not None else (self.num_tokens() if size == native else None)
        try:
            rows, cols = self.feature_grid(*size)
        except ValueError:
            if total is None:
                raise
            return FeatureGrid.sequence(total)
        extra = 0 if total is None else total - rows * cols
        if extra < 0:
            raise ValueError(f"{type(self).__name__} gave {total} features for a {size[0]}x{size[1]} input, fewer than "
                             f"the cells of its {rows}x{cols} grid")
        return FeatureGrid(rows, cols, extra)

    @abc.abstractmethod
    def export_config(self) -> Any:
        """A config that rebuilds this encoder's architecture (weights come from the checkpoint)."""


def build_vision(spec: Any) -> VisionEncoder:
    """Build a vision encoder from a dict (``{"type": ..., ...}``) or a registered config."""
    return VISION_ENCODERS.build(spec)
