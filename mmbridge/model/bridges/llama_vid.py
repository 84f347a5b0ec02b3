"""LLaMA-VID (arXiv 2311.17043): two kinds of tokens per frame, so an hour of video fits the context.

For each frame (each image row of the batch) with features ``X`` ``[N, D_v]``:

* **context token** — instruction-guided: an instruction-aware Q-Former (queries + the
  instruction tokens in self-attention, cross-attention to ``X``; the ``instruct_qformer``
  core) gives ``Q`` text queries, mapped to the visual width ``[Q, D_v]``; they attend over
  the frame, ``softmax(Q_t X^T / sqrt(D_v)) X``, and the ``Q`` results are averaged into one
  vector, then a linear projector maps it to the LLM width;
* **content tokens** — the frame's features average-pooled to ``content_tokens`` vectors
  (a square grid is pooled in 2-D when both counts are squares, e.g. 7x7 → 2x2), each
  through a second linear projector.

``num_tokens(N) == 1 + content_tokens``: with the default ``content_tokens=1`` a frame costs
exactly 2 LLM tokens, so a long video of ``F`` frames (one ``<image>`` per frame) costs
``2F``. The features are LayerNorm-ed first (``vision_norm``) for the Q-Former, the context
attention and the pooling alike. The instruction arrives as ``text_ids``/``text_mask``
(the processor's ``bridge_text_ids``/``bridge_text_mask``), tokenized with
:attr:`LlamaVidBridge.tokenizer` (BERT's, from ``init_from`` or ``tokenizer``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES, Bridge
from mmbridge.model.bridges.instruct_qformer import require_text
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, build_qformer, load_text_tokenizer,
                                            resolve_config)


@dataclass
class LlamaVidBridgeConfig(QFormerBridgeConfig):
    """The Q-Former fields (its text queries) plus ``content_tokens`` pooled content tokens per frame."""

    type: str = "llama_vid"
    content_tokens: int = 1


def pool_tokens(features: torch.Tensor, count: int) -> torch.Tensor:  # [B, N, D] -> [B, count, D]
    """Average-pool ``N`` tokens to ``count``: in 2-D when both are square numbers, else along the sequence."""
    tokens = features.shape[1]
    side, target = math.isqrt(tokens), math.isqrt(count)
    if side * side == tokens and target * target == count:
        grid = features.transpose(1, 2).unflatten(2, (side, side))  # [B, D, s, s]
        return nn.functional.adaptive_avg_pool2d(grid, target).flatten(2).transpose(1, 2)
    return nn.functional.adaptive_avg_pool1d(features.transpose(1, 2), count).transpose(1, 2)


def context_attention(text_queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``mean_q softmax(Q_t X^T / sqrt(D)) X``: ``[B, Q, D]`` queries over ``[B, N, D]`` features → ``[B, D]``."""
    scores = text_queries @ features.transpose(1, 2) / math.sqrt(features.shape[-1])  # [B, Q, N]
    return (scores.softmax(dim=-1) @ features).mean(dim=1)  # [B, D]


class LlamaVidBridge(Bridge):
    """One context token and ``content_tokens`` content tokens per frame: ``[B, N, D_v] → [B, 1 + n, D]``."""

    def __init__(self, qformer: QFormer, in_dim: int, out_dim: int, config: LlamaVidBridgeConfig,
                 tokenizer: Any = None) -> None:
        super().__init__()
        if config.content_tokens < 1:
            raise ValueError(f"llama_vid content_tokens must be >= 1, got {config.content_tokens}")
        self.qformer = qformer
        self.query_projection = nn.Linear(config.hidden_size, in_dim)
        self.context_projection = nn.Linear(in_dim, out_dim)
        self.content_projection = nn.Linear(in_dim, out_dim)
        self.content_tokens = config.content_tokens
        self.spec = config
        self.tokenizer = tokenizer

    def num_tokens(self, num_features: int) -> int:
        return 1 + self.content_tokens

    def forward(self, features: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, **context: Any) -> torch.Tensor:  # [B, N, D_v] -> [B, 1+n, D]
        text_ids = require_text("llama_vid", text_ids, features.shape[0])
        queries = self.qformer(features, text_ids.to(features.device), text_mask)[:, :self.qformer.num_queries]
        visual = features if self.qformer.vision_norm is None else self.qformer.vision_norm(features)  # [B, N, D_v]
        text_queries = self.query_projection(queries)  # [B, Q, D_v]
        context_token = self.context_projection(context_attention(text_queries, visual))  # [B, D]
        content = self.content_projection(pool_tokens(visual, self.content_tokens))  # [B, n, D]
        return torch.cat([context_token.unsqueeze(1), content], dim=1)  # [B, 1+n, D]

    def export_config(self) -> LlamaVidBridgeConfig:
        """The resolved architecture without checkpoint paths (weights and tokenizer come from the saved model)."""
        return dataclasses.replace(self.spec, init_from=None, tokenizer=None)


@BRIDGES.register("llama_vid", LlamaVidBridgeConfig)
def build_llama_vid(cfg: LlamaVidBridgeConfig, in_dim: int, out_dim: int) -> LlamaVidBridge:
    cfg = resolve_config(cfg)
    return LlamaVidBridge(build_qformer(cfg, in_dim, text_input=True), in_dim, out_dim, cfg, load_text_tokenizer(cfg))
