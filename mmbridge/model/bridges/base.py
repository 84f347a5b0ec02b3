"""The input-token bridge interface and its registry.

An input-token bridge maps vision features ``[B, N, D_v]`` to visual tokens
``[B, M, D_llm]`` that are spliced into the LLM's input embeddings at ``<image>``
positions, and reports ``num_tokens(N) == M`` so the processor can expand each
placeholder to exactly that many positions. Builders receive the encoder width
``in_dim`` and the LLM width ``out_dim``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from mmbridge.registry import Registry

BRIDGES: Registry["Bridge"] = Registry("bridge")


class Bridge(nn.Module, abc.ABC):
    """Base class for bridges; ``forward`` may take extra per-call context as keyword arguments."""

    @abc.abstractmethod
    def num_tokens(self, num_features: int) -> int:
        """Visual tokens produced per image from ``num_features`` encoder tokens."""

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, **context: Any) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        """Map encoder features ``[B, N, D_v]`` to visual tokens ``[B, M, D_llm]``."""


def build_bridge(spec: Any, in_dim: int, out_dim: int) -> Bridge:
    """Build a bridge from a dict (``{"type": "mlp", ...}``) or a registered config."""
    return BRIDGES.build(spec, in_dim, out_dim)
