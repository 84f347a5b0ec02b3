"""The vision-encoder interface every encoder adapter implements.

A :class:`VisionEncoder` maps ``pixel_values [B, 3, H, W]`` to features
``[B, N, D_v]``, says ``num_tokens`` (N) and ``feature_dim`` (D_v), carries the
:class:`ImageTransform` that prepares its input, and can describe itself as a
self-contained config (``export_config``) so a saved model is rebuilt without the
original checkpoint directory.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

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
        """(rows, cols) of the feature grid for an input of ``height × width`` pixels (row-major tokens), for
        high-resolution strategies; encoders without a size-dependent spatial grid raise."""
        if (height, width) == tuple(self.transform.output_size):
            side = int(round(self.num_tokens() ** 0.5))
            if side * side == self.num_tokens():
                return side, side
        raise ValueError(f"{type(self).__name__} cannot say its feature grid for {height}x{width} inputs; "
                         f"high-resolution strategies need an encoder with a spatial grid at any size")

    @abc.abstractmethod
    def export_config(self) -> Any:
        """A config that rebuilds this encoder's architecture (weights come from the checkpoint)."""


def build_vision(spec: Any) -> VisionEncoder:
    """Build a vision encoder from a dict (``{"type": ..., ...}``) or a registered config."""
    return VISION_ENCODERS.build(spec)
