"""Token-compressing bridges for any grid encoder: average pooling and pixel shuffle, each before a projector.

Both read the encoder's ``N`` tokens as a square, row-major ``h × h`` grid, shrink it, and hand the
result to a nested projector bridge (``projector``, any registered bridge spec; default LLaVA-1.5's
``mlp2x_gelu``) built with ``in_dim`` = the compressed width. So they compose after any encoder and
in front of any token-wise projector.

* ``pool`` — ``k × k`` average pooling with stride ``k`` (the "pooling" connectors of the survey,
  e.g. LLaMA-VID's content token, arXiv 2311.17043). When ``k`` does not divide the grid side the
  pooling runs in *ceil mode*: the last row/column of windows is partial and averages only the cells
  that exist, so ``h × h`` becomes ``ceil(h/k) × ceil(h/k)`` and no feature is dropped.
* ``pixel_shuffle`` — space-to-depth by a factor ``s``: each ``s × s`` block of cells becomes one
  token whose channels are the block's cells concatenated in row-major order,
  ``[h, h, D] → [h/s, h/s, D·s²]`` (InternVL 1.5, arXiv 2404.16821; Idefics3, arXiv 2408.12637).
  The grid side must be divisible by ``s``; nothing is averaged away, so no ceil mode.

A non-square ``N`` (or a non-divisible side for ``pixel_shuffle``) is a ``ValueError`` naming
``N`` and the factor. ``num_tokens(N)`` is exact: ``ceil(√N / k)²`` and ``(√N / s)²`` (then the
projector's own count, which is the same for token-wise projectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES, Bridge, build_bridge
from mmbridge.model.bridges.mlp import default_projector


@dataclass
class PoolBridgeConfig:
    """``kernel × kernel`` average pooling (stride ``kernel``, ceil mode), then ``projector``."""

    type: str = "pool"
    kernel: int = 2
    projector: dict = field(default_factory=default_projector)


@dataclass
class PixelShuffleBridgeConfig:
    """Space-to-depth by ``factor`` (channels × factor²), then ``projector``."""

    type: str = "pixel_shuffle"
    factor: int = 2
    projector: dict = field(default_factory=default_projector)


def square_side(num_features: int, bridge: str, factor: int) -> int:
    """The side ``h`` of a square ``h × h`` grid of ``num_features`` tokens; ``ValueError`` if there is none."""
    side = math.isqrt(num_features)
    if num_features <= 0 or side * side != num_features:
        raise ValueError(f"{bridge} bridge (factor {factor}) needs a square grid of features, "
                         f"but N={num_features} is not a perfect square")
    return side


def _check_factor(factor: int, bridge: str) -> None:
    if factor < 1:
        raise ValueError(f"{bridge} bridge factor must be >= 1, got {factor}")


def average_pool_grid(features: torch.Tensor, kernel: int) -> torch.Tensor:
    """``[B, h·h, D] → [B, ceil(h/k)², D]``: mean of each ``k × k`` block (edge blocks: of the cells they hold)."""
    batch, count, width = features.shape
    side = square_side(count, "pool", kernel)
    grid = features.transpose(1, 2).reshape(batch, width, side, side)  # [B, D, h, h]
    pooled = nn.functional.avg_pool2d(grid, kernel, stride=kernel, ceil_mode=True)  # [B, D, h', h']
    return pooled.flatten(2).transpose(1, 2)  # [B, h'·h', D]


def pixel_shuffle_grid(features: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, h·h, D] → [B, (h/s)², s²·D]``: channel ``(r·s + c)·D + d`` = channel ``d`` of block cell (r, c)."""
    batch, count, width = features.shape
    side = square_side(count, "pixel_shuffle", factor)
    if side % factor:
        raise ValueError(f"pixel_shuffle bridge: grid side {side} (N={count}) is not divisible by factor {factor}")
    blocks = side // factor
    grid = features.reshape(batch, blocks, factor, blocks, factor, width)  # [B, h/s, s, h/s, s, D]
    grid = grid.permute(0, 1, 3, 2, 4, 5)  # [B, h/s, h/s, s, s, D]
    return grid.reshape(batch, blocks * blocks, factor * factor * width)  # [B, (h/s)², s²·D]


class PoolBridge(Bridge):
    """Average-pool the square feature grid by ``kernel``, then project each pooled token."""

    def __init__(self, kernel: int, projector: Bridge) -> None:
        super().__init__()
        _check_factor(kernel, "pool")
        self.kernel = kernel
        self.projector = projector

    def num_tokens(self, num_features: int) -> int:
        pooled_side = -(-square_side(num_features, "pool", self.kernel) // self.kernel)
        return self.projector.num_tokens(pooled_side * pooled_side)

    def forward(self, features: torch.Tensor, **context: Any) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        pooled = average_pool_grid(features, self.kernel)  # [B, M, D_v]
        return self.projector(pooled, **context)  # [B, M, D]


class PixelShuffleBridge(Bridge):
    """Fold each ``factor × factor`` block of the square grid into one token's channels, then project."""

    def __init__(self, factor: int, projector: Bridge) -> None:
        super().__init__()
        _check_factor(factor, "pixel_shuffle")
        self.factor = factor
        self.projector = projector

    def num_tokens(self, num_features: int) -> int:
        side = square_side(num_features, "pixel_shuffle", self.factor)
        if side % self.factor:
            raise ValueError(f"pixel_shuffle bridge: grid side {side} (N={num_features}) is not divisible "
                             f"by factor {self.factor}")
        return self.projector.num_tokens((side // self.factor) ** 2)

    def forward(self, features: torch.Tensor, **context: Any) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        shuffled = pixel_shuffle_grid(features, self.factor)  # [B, M, s²·D_v]
        return self.projector(shuffled, **context)  # [B, M, D]


@BRIDGES.register("pool", PoolBridgeConfig)
def build_pool(cfg: PoolBridgeConfig, in_dim: int, out_dim: int) -> PoolBridge:
    return PoolBridge(cfg.kernel, build_bridge(cfg.projector, in_dim, out_dim))


@BRIDGES.register("pixel_shuffle", PixelShuffleBridgeConfig)
def build_pixel_shuffle(cfg: PixelShuffleBridgeConfig, in_dim: int, out_dim: int) -> PixelShuffleBridge:
    _check_factor(cfg.factor, "pixel_shuffle")
    return PixelShuffleBridge(cfg.factor, build_bridge(cfg.projector, in_dim * cfg.factor ** 2, out_dim))
