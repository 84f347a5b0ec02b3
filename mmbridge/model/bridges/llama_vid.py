"""LLaMA-VID (arXiv 2311.17043): two kinds of tokens per frame, so an hour of video fits the context.

For each frame (each image row of the batch) with features ``X`` ``[N, D_v]``:

* **context token** — instruction-guided: an instruction-aware Q-Former (queries + the
  instruction tokens in self-attention, cross-attention to ``X``; the ``instruct_qformer``
  core) gives ``Q`` text queries, mapped to the visual width ``[Q, D_v]``; they attend over
  the frame, ``softmax(Q_t X^T / sqrt(D_v)) X``, and the ``Q`` results are averaged into one
  vector, then a linear projector maps it to the LLM width;
* **content tokens** — the frame's features average-pooled to ``content_tokens`` vectors
  (features on a grid are pooled in 2-D when ``content_tokens`` is a square, e.g. 7x7 → 2x2; otherwise
  along the sequence), each through a second linear projector.

``num_tokens == 1 + content_tokens`` for every grid (they have no place in the image): with the default
``content_tokens=1`` a frame costs exactly 2 LLM tokens, so a long video of ``F`` frames (one ``<image>`` per
frame) costs ``2F``. The features are LayerNorm-ed first (``vision_norm``) for the Q-Former, the context
attention and the pooling alike. The instruction arrives as the per-image
:class:`~mmbridge.data.bridge_inputs.BridgeInputs` ``text_ids``/``text_mask``, tokenized with
:attr:`LlamaVidBridge.tokenizer` (BERT's, from ``init_from`` or ``tokenizer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES
from mmbridge.model.bridges.instruct_qformer import require_text
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, QueryBridge, build_qformer,
                                            load_text_tokenizer, resolve_config)
from mmbridge.model.grid import FeatureGrid


@dataclass
class LlamaVidBridgeConfig(QFormerBridgeConfig):
    """The Q-Former fields (its text queries) plus ``content_tokens`` pooled content tokens per frame."""

    type: str = "llama_vid"
    content_tokens: int = 1


def pool_tokens(features: torch.Tensor, grid: FeatureGrid, count: int) -> torch.Tensor:  # [B, N, D] -> [B, count, D]
    """Average-pool ``N`` tokens to ``count``: in 2-D over the feature grid when ``count`` is a square and every
    feature is a cell, else along the sequence."""
    target = math.isqrt(count)
    if grid.spatial and target * target == count:
        cells = features.transpose(1, 2).unflatten(2, (grid.rows, grid.cols))  # [B, D, h, w]
        return nn.functional.adaptive_avg_pool2d(cells, target).flatten(2).transpose(1, 2)
    return nn.functional.adaptive_avg_pool1d(features.transpose(1, 2), count).transpose(1, 2)


def context_attention(text_queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``mean_q softmax(Q_t X^T / sqrt(D)) X``: ``[B, Q, D]`` queries over ``[B, N, D]`` features → ``[B, D]``."""
    scores = text_queries @ features.transpose(1, 2) / math.sqrt(features.shape[-1])  # [B, Q, N]
    return (scores.softmax(dim=-1) @ features).mean(dim=1)  # [B, D]


class LlamaVidBridge(QueryBridge):
    """One context token and ``content_tokens`` content tokens per frame: ``[B, N, D_v] → [B, 1 + n, D]``."""

    def __init__(self, qformer: QFormer, in_dim: int, out_dim: int, config: LlamaVidBridgeConfig,
                 tokenizer: Any = None) -> None:
        if config.content_tokens < 1:
            raise ValueError(f"llama_vid content_tokens must be >= 1, got {config.content_tokens}")
        super().__init__(qformer, config)
        self.query_projection = nn.Linear(config.hidden_size, in_dim)
        self.context_projection = nn.Linear(in_dim, out_dim)
        self.content_projection = nn.Linear(in_dim, out_dim)
        self.content_tokens = config.content_tokens
        self.tokenizer = tokenizer

    def num_tokens(self, grid: FeatureGrid) -> int:
        return 1 + self.content_tokens

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, 1+n, D]
        text_ids, text_mask = require_text("llama_vid", inputs, features.shape[0])
        queries = self.qformer(features, text_ids.to(features.device), text_mask)[:, :self.qformer.num_queries]
        visual = features if self.qformer.vision_norm is None else self.qformer.vision_norm(features)  # [B, N, D_v]
        text_queries = self.query_projection(queries)  # [B, Q, D_v]
        context_token = self.context_projection(context_attention(text_queries, visual))  # [B, D]
        content = self.content_projection(pool_tokens(visual, grid, self.content_tokens))  # [B, n, D]
        return torch.cat([context_token.unsqueeze(1), content], dim=1)  # [B, 1+n, D]


@BRIDGES.register("llama_vid", LlamaVidBridgeConfig)
def build_llama_vid(cfg: LlamaVidBridgeConfig, in_dim: int, out_dim: int) -> LlamaVidBridge:
    cfg = resolve_config(cfg)
    return LlamaVidBridge(build_qformer(cfg, in_dim, text_input=True), in_dim, out_dim, cfg, load_text_tokenizer(cfg))
