"""Qwen-VL's position-aware vision-language adapter (Bai et al., arXiv 2308.12966), as an input-token bridge.

One cross-attention layer compresses the encoder's grid of features to ``num_queries`` tokens
(256 in Qwen-VL): learned queries attend to the features, with fixed 2D sin-cos absolute position
embeddings added to the queries (the cells of a ``√num_queries × √num_queries`` grid) and to the
keys (the cells of the feature grid), so the compression keeps where each feature came from.
As in Qwen-VL's ``Resampler``: features go through a bias-free ``kv_proj`` to ``hidden_dim`` and
``ln_kv``; queries through ``ln_q``; the values carry no positions; the output goes through
``ln_post`` and a bias-free ``proj`` to the LLM width.

Positions. Qwen-VL bicubically resizes its query-grid table to the feature grid. Here the sin-cos
functions are evaluated directly at the feature cells' centres expressed in query-grid units
(``(i + 0.5) · G / h - 0.5`` for row ``i`` of ``h``, ``G = √num_queries``), which are the points
that resizing samples, so any ``h × w`` works without interpolation and both grids share one frame.

The feature grid is the one the encoder reports for the call (any ``h × w``; crops of a high-resolution
strategy each bring their own). ``num_tokens == num_queries`` for every grid; the queries have no place of
their own in the image (``token_grid`` is None), since each reads the whole grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, Bridge
from mmbridge.model.grid import FeatureGrid


@dataclass
class QwenResamplerConfig:
    """``num_queries``: a perfect square; ``hidden_dim`` (default: LLM width): a multiple of 4 and of ``heads``."""

    type: str = "qwen_resampler"
    num_queries: int = 256
    heads: int = 8
    hidden_dim: int | None = None


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[P] → [P, dim]``: ``sin(p·ω_k)`` then ``cos(p·ω_k)`` with ``ω_k = 10000^(-k/(dim/2))`` (dim even)."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * frequencies[None, :]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [P, dim]


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """``[len(rows)·len(cols), dim]`` for the row-major grid ``rows × cols``: row code, then column code."""
    row_codes = sincos_1d(rows, dim // 2)  # [h, dim/2]
    col_codes = sincos_1d(cols, dim // 2)  # [w, dim/2]
    height, width = len(rows), len(cols)
    grid = torch.cat([row_codes[:, None].expand(height, width, -1),
                      col_codes[None, :].expand(height, width, -1)], dim=-1)  # [h, w, dim]
    return grid.reshape(height * width, dim)


def cell_centres(cells: int, query_side: int) -> torch.Tensor:
    """Centres of ``cells`` equal cells spanning ``query_side`` query cells, in query-cell units: ``[cells]``."""
    return (torch.arange(cells, dtype=torch.float64) + 0.5) * (query_side / cells) - 0.5


class QwenResampler(Bridge):
    """Learned queries + one ``nn.MultiheadAttention`` over the features, with 2D sin-cos positions."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, heads: int, hidden_dim: int) -> None:
        super().__init__()
        self.query_side = math.isqrt(num_queries)
        if num_queries < 1 or self.query_side ** 2 != num_queries:
            raise ValueError(f"qwen_resampler num_queries must be a perfect square (a query grid), got {num_queries}")
        if hidden_dim % 4 or hidden_dim % heads:
            raise ValueError(f"qwen_resampler hidden_dim {hidden_dim} must be divisible by 4 (2D sin-cos) "
                             f"and by heads ({heads})")
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.query = nn.Parameter(torch.empty(num_queries, hidden_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.ln_q = nn.LayerNorm(hidden_dim)
        self.ln_kv = nn.LayerNorm(hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, heads, batch_first=True)
        self.ln_post = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim, bias=False)

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.num_queries

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return None

    def query_positions(self) -> torch.Tensor:
        """Sin-cos codes of the query grid's cells, ``[num_queries, hidden]``."""
        cells = torch.arange(self.query_side, dtype=torch.float64)
        return sincos_2d(cells, cells, self.hidden_dim)

    def key_positions(self, height: int, width: int) -> torch.Tensor:
        """Sin-cos codes of an ``height × width`` feature grid in query-grid units, ``[h·w, hidden]``."""
        rows, cols = cell_centres(height, self.query_side), cell_centres(width, self.query_side)
        return sincos_2d(rows, cols, self.hidden_dim)

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, Q, D]
        height, width = grid.cells("qwen_resampler (2D positions of the features)", features.shape[1])
        values = self.ln_kv(self.kv_proj(features))  # [B, N, H]
        keys = values + self.key_positions(height, width).to(values)  # [B, N, H]
        queries = self.ln_q(self.query) + self.query_positions().to(values)  # [Q, H]
        queries = queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, Q, H]
        attended, _ = self.attn(queries, keys, values, need_weights=False)  # [B, Q, H]
        return self.proj(self.ln_post(attended))  # [B, Q, D]


@BRIDGES.register("qwen_resampler", QwenResamplerConfig)
def build_qwen_resampler(cfg: QwenResamplerConfig, in_dim: int, out_dim: int) -> QwenResampler:
    return QwenResampler(in_dim, out_dim, cfg.num_queries, cfg.heads, cfg.hidden_dim or out_dim)
