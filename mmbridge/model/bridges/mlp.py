"""The MLP bridge family: LLaVA's linear projection, LLaVA-1.5's ``mlp2x_gelu``, CogVLM's SwiGLU adapter.

* ``linear`` — one ``Linear(D_v, D_llm)`` (LLaVA, arXiv 2304.08485).
* ``mlp`` — ``depth`` linear layers with an activation between them; depth 2 + GELU is
  LLaVA-1.5's ``mlp2x_gelu`` (arXiv 2310.03744) and has the same parameter layout as
  transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``).
* ``swiglu`` — ``down(silu(gate(x)) * up(x))`` after an input projection, the 2-layer
  SwiGLU adapter of CogVLM (arXiv 2311.03079).

All map each feature to one token: the token grid is the feature grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, TokenWiseBridge
from mmbridge.model.grid import FeatureGrid


def default_projector() -> dict:
    """LLaVA-1.5's ``mlp2x_gelu`` projector spec (the default of bridges that take a ``projector``)."""
    return {"type": "mlp", "depth": 2, "activation": "gelu"}


@dataclass
class LinearBridgeConfig:
    type: str = "linear"
    bias: bool = True


@dataclass
class MLPBridgeConfig:
    """``depth`` linear layers; hidden width defaults to the LLM width (as LLaVA-1.5)."""

    type: str = "mlp"
    depth: int = 2
    activation: str = "gelu"
    hidden_dim: int | None = None
    bias: bool = True


@dataclass
class SwiGLUBridgeConfig:
    """CogVLM adapter: ``linear_proj`` to the LLM width, then a SwiGLU MLP of width ``hidden_dim``."""

    type: str = "swiglu"
    hidden_dim: int | None = None
    bias: bool = False


class MLPBridge(TokenWiseBridge):
    """``Linear → act → Linear → …``; layers are named ``linear_1 … linear_depth``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, activation: str, hidden_dim: int | None,
                 bias: bool) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp bridge depth must be >= 1, got {depth}")
        if activation not in ACT2FN:
            raise ValueError(f"mlp bridge activation {activation!r} is unknown; known: {sorted(ACT2FN)}")
        hidden = hidden_dim or out_dim
        widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.depth = depth
        for index in range(depth):
            self.add_module(f"linear_{index + 1}", nn.Linear(widths[index], widths[index + 1], bias=bias))
        self.act = ACT2FN[activation]

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, N, D]
        hidden = features
        for index in range(1, self.depth + 1):
            if index > 1:
                hidden = self.act(hidden)
            hidden = getattr(self, f"linear_{index}")(hidden)
        return hidden


class SwiGLUBridge(TokenWiseBridge):
    """CogVLM's GLU adapter: ``x = proj(f)``; ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None, bias: bool) -> None:
        super().__init__()
        hidden = hidden_dim or 4 * out_dim
        self.linear_proj = nn.Linear(in_dim, out_dim, bias=bias)
        self.gate_proj = nn.Linear(out_dim, hidden, bias=bias)
        self.up_proj = nn.Linear(out_dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, out_dim, bias=bias)

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, N, D]
        hidden = self.linear_proj(features)  # [B, N, D]
        return self.down_proj(nn.functional.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


@BRIDGES.register("linear", LinearBridgeConfig)
def build_linear(cfg: LinearBridgeConfig, in_dim: int, out_dim: int) -> MLPBridge:
    return MLPBridge(in_dim, out_dim, depth=1, activation="linear", hidden_dim=None, bias=cfg.bias)


@BRIDGES.register("mlp", MLPBridgeConfig)
def build_mlp(cfg: MLPBridgeConfig, in_dim: int, out_dim: int) -> MLPBridge:
    return MLPBridge(in_dim, out_dim, cfg.depth, cfg.activation, cfg.hidden_dim, cfg.bias)


@BRIDGES.register("swiglu", SwiGLUBridgeConfig)
def build_swiglu(cfg: SwiGLUBridgeConfig, in_dim: int, out_dim: int) -> SwiGLUBridge:
    return SwiGLUBridge(in_dim, out_dim, cfg.hidden_dim, cfg.bias)
