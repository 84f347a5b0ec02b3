"""Flamingo's Perceiver Resampler (Alayrac et al., arXiv 2204.14198), as an input-token bridge.

A fixed set of ``num_latents`` learned latents (64 in Flamingo) reads a variable number of visual
features and always returns ``num_latents`` tokens. Each of the ``depth`` layers is

    latents = latents + Attention(q = LN(latents), kv = concat(LN(features), LN(latents)))
    latents = latents + FFN(latents)          # LN → Linear(×ff_mult) → GELU → Linear

Keys and values are the features *and* the latents, as in the paper. Features first go through a
linear input projection to ``hidden_dim`` (default ``min(LLM width, 1024)``); the latents leave
through a LayerNorm and a linear map to the LLM width.

IDEFICS' layout (for :mod:`mmbridge.interop.idefics`) is a matter of options: ``head_dim`` apart from
``hidden_dim / heads``, ``activation: relu``, and ``project: false`` — no input or output projection,
the latents stay at the encoder's width (``output_dim``), for a consumer that maps them itself
(gated cross-attention's keys and values).

Video: ``forward`` takes ``[B, N, D_v]`` (one frame) or ``[B, T, N, D_v]`` with ``T ≤ max_frames``;
a learned temporal embedding is added to every feature of frame ``t`` and time × space is flattened
before the latents attend, so frame order changes the output. A video sent as one media by the processor
arrives as frames ``[n_frames, N, D_v]`` with ``inputs.media_frames`` (the frames of each media).
``num_tokens == num_latents`` for every grid; latents have no place in the image (``token_grid`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, Bridge, ProcessorNeeds
from mmbridge.model.grid import FeatureGrid

DEFAULT_MAX_HIDDEN = 1024


@dataclass
class PerceiverConfig:
    """``hidden_dim`` (default ``min(LLM width, 1024)``) must be divisible by ``heads``."""

    type: str = "perceiver"
    num_latents: int = 64
    depth: int = 2
    heads: int = 8
    hidden_dim: int | None = None
    ff_mult: int = 4
    max_frames: int = 8
    head_dim: int | None = None  # None: hidden_dim // heads
    activation: str = "gelu"  # the FFN's: gelu (Flamingo) or relu (IDEFICS)
    project: bool = True  # False: no input/output projection; hidden_dim is the encoder's width, and so is the output


class PerceiverAttention(nn.Module):
    """Multi-head attention from normalised latents to ``concat(normalised features, normalised latents)``."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"perceiver hidden_dim {dim} must be divisible by heads ({heads}), or give head_dim")
        self.heads = heads
        inner = heads * (head_dim or dim // heads)
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L, inner] -> [B, heads, L, inner/heads]
        batch, length, width = tokens.shape
        return tokens.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # [B, S, H], [B, L, H] -> [B, L, H]
        latents = self.norm_latents(latents)  # [B, L, H]
        context = torch.cat([self.norm_media(media), latents], dim=1)  # [B, S + L, H]
        keys, values = self.to_kv(context).chunk(2, dim=-1)  # [B, S + L, H] each
        queries = self.split_heads(self.to_q(latents))  # [B, heads, L, H/heads]
        attended = nn.functional.scaled_dot_product_attention(
            queries, self.split_heads(keys), self.split_heads(values))  # [B, heads, L, H/heads]
        return self.to_out(attended.transpose(1, 2).flatten(2))  # [B, L, H]


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def feed_forward(dim: int, mult: int, activation: str = "gelu") -> nn.Sequential:
    """Flamingo's FFN: ``LN → Linear(dim, mult·dim) → GELU (or ReLU) → Linear(mult·dim, dim)``, bias-free."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"perceiver activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), ACTIVATIONS[activation](),
                         nn.Linear(mult * dim, dim, bias=False))


class PerceiverLayer(nn.Module):
    """One resampler layer: residual cross-attention, then residual FFN."""

    def __init__(self, dim: int, heads: int, ff_mult: int, head_dim: int | None = None,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.attention = PerceiverAttention(dim, heads, head_dim)
        self.feed_forward = feed_forward(dim, ff_mult, activation)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # [B, S, H], [B, L, H] -> [B, L, H]
        latents = latents + self.attention(media, latents)  # [B, L, H]
        return latents + self.feed_forward(latents)  # [B, L, H]


class PerceiverResampler(Bridge):
    """Learned latents cross-attend to (time × space) features; ``num_latents`` tokens out for any input."""

    def __init__(self, in_dim: int, out_dim: int, num_latents: int, depth: int, heads: int, hidden_dim: int,
                 ff_mult: int, max_frames: int, head_dim: int | None = None, activation: str = "gelu",
                 project: bool = True) -> None:
        super().__init__()
        for name, value in (("num_latents", num_latents), ("depth", depth), ("ff_mult", ff_mult),
                            ("max_frames", max_frames)):
            if value < 1:
                raise ValueError(f"perceiver {name} must be >= 1, got {value}")
        self.num_latents = num_latents
        self.max_frames = max_frames
        if not project:
            hidden_dim = out_dim = in_dim
        self.output_dim = out_dim
        self.input_proj = nn.Linear(in_dim, hidden_dim) if project else nn.Identity()
        self.latents = nn.Parameter(torch.empty(num_latents, hidden_dim))
        self.time_embeddings = nn.Parameter(torch.empty(max_frames, hidden_dim))
        nn.init.normal_(self.latents, std=0.02)
        nn.init.normal_(self.time_embeddings, std=0.02)
        self.layers = nn.ModuleList(PerceiverLayer(hidden_dim, heads, ff_mult, head_dim, activation)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, out_dim) if project else nn.Identity()

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.num_latents

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return None

    def processor_needs(self) -> ProcessorNeeds:
        """A video's frames reach the resampler together, as one media behind one placeholder."""
        return ProcessorNeeds(video_frames=self.max_frames)

    def media_sequence(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, D_v] | [B, T, N, D_v] -> [B, T·N, H]
        """Project features, add each frame's temporal embedding and flatten time × space."""
        if features.dim() not in (3, 4):
            raise ValueError(f"perceiver expects features [B, N, D] or [B, T, N, D], got shape {tuple(features.shape)}")
        frames = features if features.dim() == 4 else features.unsqueeze(1)  # [B, T, N, D_v]
        count = frames.shape[1]
        if count > self.max_frames:
            raise ValueError(f"perceiver got {count} frames but max_frames is {self.max_frames}")
        media = self.input_proj(frames) + self.time_embeddings[:count, None, :]  # [B, T, N, H]
        return media.flatten(1, 2)  # [B, T·N, H]

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, (T,) N, D_v] -> [B, L, D]
        """``inputs.media_frames`` (``[n_media, 1]``, what the processor sends with video) groups the rows of
        ``features`` ``[n_frames, N, D_v]`` into media of that many consecutive frames; one output per media."""
        media_frames = inputs.media_frames if inputs is not None else None
        if media_frames is not None and features.dim() == 3:
            counts = [int(count) for count in media_frames.reshape(-1).tolist()]
            if sum(counts) != features.shape[0]:
                raise ValueError(f"media_frames add up to {sum(counts)} frames but {features.shape[0]} were encoded")
            if any(count != 1 for count in counts):
                return torch.cat([self.resample(chunk.unsqueeze(0)) for chunk in features.split(counts)])
        return self.resample(features)

    def resample(self, features: torch.Tensor) -> torch.Tensor:  # [B, (T,) N, D_v] -> [B, L, D]
        media = self.media_sequence(features)  # [B, T·N, H]
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)  # [B, L, H]
        for layer in self.layers:
            latents = layer(media, latents)  # [B, L, H]
        return self.output_proj(self.norm(latents))  # [B, L, D]


@BRIDGES.register("perceiver", PerceiverConfig)
def build_perceiver(cfg: PerceiverConfig, in_dim: int, out_dim: int) -> PerceiverResampler:
    hidden_dim = cfg.hidden_dim or min(out_dim, DEFAULT_MAX_HIDDEN)
    return PerceiverResampler(in_dim, out_dim, cfg.num_latents, cfg.depth, cfg.heads, hidden_dim, cfg.ff_mult,
                              cfg.max_frames, cfg.head_dim, cfg.activation, cfg.project)
