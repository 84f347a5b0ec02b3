"""Token-compressing bridges for any grid encoder: average pooling and pixel shuffle, each before a projector.

Both read the encoder's features as the ``rows × cols`` grid the encoder reports (row-major), shrink it, and
hand the result to a nested projector bridge (``projector``, any registered bridge spec; default LLaVA-1.5's
``mlp2x_gelu``) built with ``in_dim`` = the compressed width, together with the shrunk grid. So they compose
after any grid encoder and in front of any projector, and report the grid they leave (``token_grid``), which
high-resolution strategies stitch and the region–word objective reads.

* ``pool`` — ``k × k`` average pooling with stride ``k`` (the "pooling" connectors of the survey,
  e.g. LLaMA-VID's content token, arXiv 2311.17043). When ``k`` does not divide a side the pooling runs in
  *ceil mode*: the last row/column of windows is partial and averages only the cells that exist, so
  ``h × w`` becomes ``ceil(h/k) × ceil(w/k)`` and no feature is dropped.
* ``pixel_shuffle`` — space-to-depth by a factor ``s``: each ``s × s`` block of cells becomes one
  token whose channels are the block's cells concatenated in row-major order,
  ``[h, w, D] → [h/s, w/s, D·s²]`` (InternVL 1.5, arXiv 2404.16821; Idefics3, arXiv 2408.12637; the same
  channel order as transformers' ``InternVLModel.pixel_shuffle`` and ``Idefics3Connector.pixel_shuffle``).
  Both sides must divide by ``s`` (:meth:`PixelShuffleBridge.grid_divisor`); nothing is averaged away.

Features that are not all cells of a grid (a kept CLS token, a plain sequence) are a ``ValueError``, as is a
side that ``pixel_shuffle`` cannot divide; each names the grid and the factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, Bridge, build_bridge
from mmbridge.model.bridges.mlp import default_projector
from mmbridge.model.grid import FeatureGrid


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


def _check_factor(factor: int, bridge: str) -> None:
    if factor < 1:
        raise ValueError(f"{bridge} bridge factor must be >= 1, got {factor}")


def pooled_grid(grid: FeatureGrid, kernel: int) -> FeatureGrid:
    """The grid left by ``kernel × kernel`` pooling in ceil mode."""
    rows, cols = grid.cells(f"pool bridge (kernel {kernel})")
    return FeatureGrid(-(-rows // kernel), -(-cols // kernel))


def shuffled_grid(grid: FeatureGrid, factor: int) -> FeatureGrid:
    """The grid left by space-to-depth by ``factor``; a ``ValueError`` when a side does not divide."""
    rows, cols = grid.cells(f"pixel_shuffle bridge (factor {factor})")
    if rows % factor or cols % factor:
        raise ValueError(f"pixel_shuffle bridge: the feature grid {rows}x{cols} does not divide by factor {factor}")
    return FeatureGrid(rows // factor, cols // factor)


def average_pool_grid(features: torch.Tensor, grid: FeatureGrid, kernel: int) -> torch.Tensor:
    """``[B, h·w, D] → [B, ceil(h/k)·ceil(w/k), D]``: mean of each ``k × k`` block (edge blocks: of the cells they
    hold)."""
    batch, count, width = features.shape
    rows, cols = grid.cells(f"pool bridge (kernel {kernel})", count)
    cells = features.transpose(1, 2).reshape(batch, width, rows, cols)  # [B, D, h, w]
    pooled = nn.functional.avg_pool2d(cells, kernel, stride=kernel, ceil_mode=True)  # [B, D, h', w']
    return pooled.flatten(2).transpose(1, 2)  # [B, h'·w', D]


def pixel_shuffle_grid(features: torch.Tensor, grid: FeatureGrid, factor: int) -> torch.Tensor:
    """``[B, h·w, D] → [B, (h/s)·(w/s), s²·D]``: channel ``(r·s + c)·D + d`` is channel ``d`` of block cell
    (r, c)."""
    batch, count, width = features.shape
    grid.cells(f"pixel_shuffle bridge (factor {factor})", count)
    shuffled = shuffled_grid(grid, factor)
    blocks = features.reshape(batch, shuffled.rows, factor, shuffled.cols, factor, width)  # [B, h/s, s, w/s, s, D]
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, D]
    return blocks.reshape(batch, shuffled.count, factor * factor * width)  # [B, (h/s)·(w/s), s²·D]


class PoolBridge(Bridge):
    """Average-pool the square feature grid by ``kernel``, then project each pooled token."""

    def __init__(self, kernel: int, projector: Bridge) -> None:
        super().__init__()
        _check_factor(kernel, "pool")
        self.kernel = kernel
        self.projector = projector

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.projector.num_tokens(pooled_grid(grid, self.kernel))

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return self.projector.token_grid(pooled_grid(grid, self.kernel))

    def grid_divisor(self) -> int:
        inner = self.projector.grid_divisor()  # the pooled grid must divide by it: so must the input, k times over
        return 1 if inner == 1 else self.kernel * inner

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        pooled = average_pool_grid(features, grid, self.kernel)  # [B, M, D_v]
        return self.projector(pooled, pooled_grid(grid, self.kernel), inputs)  # [B, M, D]


class PixelShuffleBridge(Bridge):
    """Fold each ``factor × factor`` block of the square grid into one token's channels, then project."""

    def __init__(self, factor: int, projector: Bridge) -> None:
        super().__init__()
        _check_factor(factor, "pixel_shuffle")
        self.factor = factor
        self.projector = projector

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.projector.num_tokens(shuffled_grid(grid, self.factor))

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return self.projector.token_grid(shuffled_grid(grid, self.factor))

    def grid_divisor(self) -> int:
        return self.factor * self.projector.grid_divisor()

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        shuffled = pixel_shuffle_grid(features, grid, self.factor)  # [B, M, s²·D_v]
        return self.projector(shuffled, shuffled_grid(grid, self.factor), inputs)  # [B, M, D]


@BRIDGES.register("pool", PoolBridgeConfig)
def build_pool(cfg: PoolBridgeConfig, in_dim: int, out_dim: int) -> PoolBridge:
    return PoolBridge(cfg.kernel, build_bridge(cfg.projector, in_dim, out_dim))


@BRIDGES.register("pixel_shuffle", PixelShuffleBridgeConfig)
def build_pixel_shuffle(cfg: PixelShuffleBridgeConfig, in_dim: int, out_dim: int) -> PixelShuffleBridge:
    _check_factor(cfg.factor, "pixel_shuffle")
    return PixelShuffleBridge(cfg.factor, build_bridge(cfg.projector, in_dim * cfg.factor ** 2, out_dim))
