"""InternVL's connector (Chen et al., "How Far Are We to GPT-4V?", arXiv 2404.16821; InternVL 2.5/3): pixel shuffle,
then ``LayerNorm → Linear → GELU → Linear``.

Each ``factor × factor`` block of the encoder's grid becomes one token whose channels are the block's cells in
row-major order (InternVL's ``downsample_ratio`` 0.5 is ``factor`` 2: a 32×32 ViT grid gives 256 tokens), then
an MLP with a LayerNorm in front maps the ``factor²·D_v`` channels to the LLM width. The parameter names are
transformers' ``InternVLMultiModalProjector``'s (``layer_norm``, ``linear_1``, ``linear_2``), and
``tests/test_bridges_internvl.py`` holds the output to transformers' ``pixel_shuffle`` + projector. InternVL
drops the CLS token first: use a vision encoder whose features are the patch grid (``select: default``).

The whole bridge is this file: the layout it reports (``token_grid``, ``num_tokens``, ``grid_divisor``) is what
the processor, the high-resolution strategies and the region–word objective read; nothing else changed to add it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, Bridge
from mmbridge.model.bridges.compress import pixel_shuffle_grid, shuffled_grid
from mmbridge.model.grid import FeatureGrid


@dataclass
class InternVLBridgeConfig:
    """``factor``: pixel shuffle's block side (1 / InternVL's ``downsample_ratio``); ``activation`` between the
    two linear layers (InternVL's ``projector_hidden_act``)."""

    type: str = "internvl"
    factor: int = 2
    activation: str = "gelu"


class InternVLBridge(Bridge):
    """Pixel shuffle by ``factor``, then LayerNorm and a two-layer MLP: ``[B, h·w, D_v] → [B, h·w / s², D]``."""

    def __init__(self, in_dim: int, out_dim: int, factor: int, activation: str) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"internvl bridge factor must be >= 1, got {factor}")
        if activation not in ACT2FN:
            raise ValueError(f"internvl bridge activation {activation!r} is unknown; known: {sorted(ACT2FN)}")
        self.factor = factor
        width = in_dim * factor * factor
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, out_dim)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def num_tokens(self, grid: FeatureGrid) -> int:
        return shuffled_grid(grid, self.factor).count

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        shuffled = shuffled_grid(grid, self.factor)
        return shuffled.rows, shuffled.cols

    def grid_divisor(self) -> int:
        return self.factor

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, N / s², D]
        shuffled = pixel_shuffle_grid(features, grid, self.factor)  # [B, M, s²·D_v]
        return self.linear_2(self.act(self.linear_1(self.layer_norm(shuffled))))  # [B, M, D]


@BRIDGES.register("internvl", InternVLBridgeConfig)
def build_internvl(cfg: InternVLBridgeConfig, in_dim: int, out_dim: int) -> InternVLBridge:
    return InternVLBridge(in_dim, out_dim, cfg.factor, cfg.activation)
