"""The instruction-aware Q-Former (InstructBLIP, arXiv 2305.06500).

The instruction tokens join the learned queries in the Q-Former's self-attention, so the
queries extract the image features the instruction asks about; only the query positions
(``[:, :Q]``) go through the FC layer to the LLM. The instruction is the text of the user
turn holding each image (``<image>`` placeholders removed), tokenized with the bridge's own
BERT tokenizer (:attr:`InstructQFormerBridge.tokenizer`); the processor writes it as the
per-image batch inputs ``bridge_text_ids``/``bridge_text_mask`` ``[n_images, T]``, which
reach :meth:`InstructQFormerBridge.forward` as ``text_ids``/``text_mask``.

Same config fields as ``qformer`` (:class:`~mmbridge.model.bridges.qformer.QFormerBridgeConfig`);
the Q-Former is built with text input (word/position embeddings and the text FFN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES, Bridge
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, build_qformer, load_text_tokenizer,
                                            resolve_config)


@dataclass
class InstructQFormerBridgeConfig(QFormerBridgeConfig):
    """InstructBLIP's Q-Former: BLIP-2's fields; the instruction enters the self-attention."""

    type: str = "instruct_qformer"


def require_text(kind: str, text_ids: torch.Tensor | None, count: int) -> torch.Tensor:
    """``text_ids`` ``[n_images, T]``, checked against the image count; a clear error when absent."""
    if text_ids is None:
        raise ValueError(f"the {kind} bridge needs the instruction per image: pass bridge_text_ids (and "
                         f"bridge_text_mask) [n_images, T], as the processor of a model with this bridge writes them")
    if text_ids.shape[0] != count:
        raise ValueError(f"the {kind} bridge got instruction ids for {text_ids.shape[0]} image(s) "
                         f"but {count} image(s)")
    return text_ids


class InstructQFormerBridge(Bridge):
    """Queries + instruction tokens through the Q-Former; the query outputs ``[B, Q, H]`` → FC → ``[B, Q, D]``."""

    def __init__(self, qformer: QFormer, out_dim: int, config: QFormerBridgeConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.qformer = qformer
        self.projection = nn.Linear(config.hidden_size, out_dim)
        self.spec = config
        self.tokenizer = tokenizer

    def num_tokens(self, num_features: int) -> int:
        return self.qformer.num_queries

    def forward(self, features: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, **context: Any) -> torch.Tensor:  # [B, N, D_v] -> [B, Q, D]
        text_ids = require_text("instruct_qformer", text_ids, features.shape[0])
        hidden = self.qformer(features, text_ids.to(features.device), text_mask)  # [B, Q+T, H]
        return self.projection(hidden[:, :self.qformer.num_queries])  # [B, Q, D]

    def export_config(self) -> InstructQFormerBridgeConfig:
        """The resolved architecture without checkpoint paths (weights and tokenizer come from the saved model)."""
        return dataclasses.replace(self.spec, init_from=None, tokenizer=None)


@BRIDGES.register("instruct_qformer", InstructQFormerBridgeConfig)
def build_instruct_qformer(cfg: InstructQFormerBridgeConfig, in_dim: int, out_dim: int) -> InstructQFormerBridge:
    cfg = resolve_config(cfg)
    return InstructQFormerBridge(build_qformer(cfg, in_dim, text_input=True), out_dim, cfg, load_text_tokenizer(cfg))
