"""NExT-GPT's output projection (Wu et al., "NExT-GPT: Any-to-Any Multimodal LLM", arXiv 2309.05519): the LLM's
signal tokens → the conditioning a generator is called with.

The reference's ``TextFcLayer`` in its "transformer" mode (after GILL's mapper, Koh et al. arXiv 2305.17216): the
signal tokens' last hidden states, each plus its input embedding, go through a ``Linear(D_llm → hidden)``; an
``nn.Transformer`` (``norm_first``, no dropout; NExT-GPT: hidden 512, 4 encoder and 4 decoder layers, 4 heads,
feed-forward 2048) encodes them, and ``queries`` learned decoder queries (77 for an image generator's text
conditioning) read them; a ``Linear(hidden → width)`` gives the generator's conditioning ``[n, queries, width]``.
"""

from __future__ import annotations

import torch
from torch import nn


class OutputProjection(nn.Module):
    """``[n, S, D_llm]`` signal-token states → ``[n, queries, width]`` conditioning."""

    def __init__(self, llm_width: int, width: int, queries: int, hidden: int = 512, layers: tuple[int, int] = (4, 4),
                 heads: int = 4, feed_forward: int = 2048) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"output projection: hidden {hidden} is not divisible by {heads} heads")
        self.input = nn.Linear(llm_width, hidden)
        layer = dict(d_model=hidden, nhead=heads, dim_feedforward=feed_forward, dropout=0.0, batch_first=True,
                     norm_first=True)
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), layers[0], nn.LayerNorm(hidden),
                                        enable_nested_tensor=False)  # nested tensors do not run norm-first layers
        self.transformer = nn.Transformer(**layer, num_decoder_layers=layers[1], custom_encoder=encoder)
        self.queries = nn.Parameter(torch.randn(queries, hidden) * hidden ** -0.5)
        self.output = nn.Linear(hidden, width)

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [n, S, D_llm] -> [n, queries, width]
        encoded = self.input(states)  # [n, S, hidden]
        queries = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1).to(encoded.dtype)  # [n, Q, hidden]
        return self.output(self.transformer(encoded, queries))  # [n, Q, width]
