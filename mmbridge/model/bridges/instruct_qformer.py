"""The instruction-aware Q-Former (InstructBLIP, arXiv 2305.06500).

The instruction tokens join the learned queries in the Q-Former's self-attention, so the
queries extract the image features the instruction asks about; only the query positions
(``[:, :Q]``) go through the FC layer to the LLM. The instruction is the text of the user
turn holding each image (``<image>`` placeholders removed), tokenized with the bridge's own
BERT tokenizer (:attr:`InstructQFormerBridge.tokenizer`); the processor writes it as the
per-image :class:`~mmbridge.data.bridge_inputs.BridgeInputs` ``text_ids``/``text_mask`` ``[n_images, T]``
(transformers' ``qformer_input_ids``/``qformer_attention_mask``), which
:meth:`InstructQFormerBridge.forward` reads.

Same config fields as ``qformer`` (:class:`~mmbridge.model.bridges.qformer.QFormerBridgeConfig`);
the Q-Former is built with text input (word/position embeddings and the text FFN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES
from mmbridge.model.bridges.qformer import (QFormer, QFormerBridgeConfig, QueryBridge, build_qformer,
                                            load_text_tokenizer, resolve_config)
from mmbridge.model.grid import FeatureGrid


@dataclass
class InstructQFormerBridgeConfig(QFormerBridgeConfig):
    """InstructBLIP's Q-Former: BLIP-2's fields; the instruction enters the self-attention."""

    type: str = "instruct_qformer"


def require_text(kind: str, inputs: BridgeInputs | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``text_ids``, ``text_mask`` ``[n_images, T]``, checked against the image count; a clear error when absent."""
    if inputs is None or inputs.text_ids is None:
        raise ValueError(f"the {kind} bridge needs the instruction per image: pass bridge_inputs=BridgeInputs("
                         f"text_ids=..., text_mask=...) [n_images, T], as the processor of a model with this bridge "
                         f"writes them")
    if inputs.text_ids.shape[0] != count:
        raise ValueError(f"the {kind} bridge got instruction ids for {inputs.text_ids.shape[0]} image(s) "
                         f"but {count} image(s)")
    return inputs.text_ids, inputs.text_mask


class InstructQFormerBridge(QueryBridge):
    """Queries + instruction tokens through the Q-Former; the query outputs ``[B, Q, H]`` → FC → ``[B, Q, D]``."""

    def __init__(self, qformer: QFormer, out_dim: int, config: QFormerBridgeConfig, tokenizer: Any = None) -> None:
        super().__init__(qformer, config)
        self.projection = nn.Linear(config.hidden_size, out_dim)
        self.tokenizer = tokenizer

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, Q, D]
        text_ids, text_mask = require_text("instruct_qformer", inputs, features.shape[0])
        hidden = self.qformer(features, text_ids.to(features.device), text_mask)  # [B, Q+T, H]
        return self.projection(hidden[:, :self.qformer.num_queries])  # [B, Q, D]


@BRIDGES.register("instruct_qformer", InstructQFormerBridgeConfig)
def build_instruct_qformer(cfg: InstructQFormerBridgeConfig, in_dim: int, out_dim: int) -> InstructQFormerBridge:
    cfg = resolve_config(cfg)
    return InstructQFormerBridge(build_qformer(cfg, in_dim, text_input=True), out_dim, cfg, load_text_tokenizer(cfg))
