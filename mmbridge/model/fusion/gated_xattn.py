"""``gated_xattn``: Flamingo's gated cross-attention (Alayrac et al., "Flamingo: a Visual Language Model for
Few-Shot Learning", arXiv 2204.14198), in the layout of IDEFICS, its open reproduction.

Images do not occupy sequence positions as visual tokens. A resampler (``resampler``: any
input-token bridge; Flamingo's Perceiver Resampler with 64 latents by default) turns each image's
features into latents, and a GATED XATTN-DENSE block before every ``every``-th decoder layer of
the frozen LLM lets the text read them:

    y = x + tanh(α_attn) · XAttn(norm(x), latents)       (zeroed where a token may see no image)
    y = y + tanh(α_ff)   · FFW(norm(y))

with α = ``alpha_init`` (0: the frozen LLM is unchanged at start). The blocks act through a
forward pre-hook on the decoder layer they precede, so the LLM's modules and names stay its own.

Each ``<image>`` in the text is one token and ``<|endofchunk|>`` ends a chunk of interleaved
text; both take embeddings that belong to the bridge (``marker_embeddings``), written over the
LLM's rows, which stay frozen and unused. φ masking: a token cross-attends only to the latents
of the last ``<image>`` at or before it (none before the first image; ``attend: all_previous``
reads every image so far). While decoding, new tokens keep reading the prompt's last image, and
each block computes the latents' keys and values once per ``generate`` run (:class:`XAttnPrompt` is the
prompt state every step reads; the blocks keep the keys and values of the latest one until
:meth:`GatedXAttnBridge.release_caches`). IDEFICS' ``image_attention_mask`` ``[B, L, N]`` may replace φ:
it says which of each row's ``N`` image slots each position reads.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.model.bridges.base import BRIDGES, ProcessorNeeds
from mmbridge.model.fusion.base import FusionBridge, projector_of, selected_layers
from mmbridge.model.fusion.gate_plot import plot_gates
from mmbridge.model.grid import FeatureGrid

ATTEND = ("last", "all_previous")
CHUNK_TOKEN = "<|endofchunk|>"


@dataclass
class GatedXAttnConfig:
    """``every``/``layers``: which decoder layers get a block in front; ``heads`` and ``intermediate_size``
    default to the LLM's; ``attend``: ``last`` (φ, Flamingo) or ``all_previous``."""

    type: str = "gated_xattn"
    resampler: Any = field(default_factory=lambda: {"type": "perceiver", "num_latents": 64})
    every: int = 1
    layers: list[int] | None = None
    heads: int | None = None
    intermediate_size: int | None = None
    attend: str = "last"
    alpha_init: float = 0.0
    chunk_token: str | None = CHUNK_TOKEN  # None: no chunk token (IDEFICS has none)


@dataclass(frozen=True)
class XAttnPrompt:
    """What a prompt's images say for every call of its run: the latents of its images ``[n, M, D]`` in order,
    each row's image count ``[B]``, and IDEFICS' ``image_attention_mask`` ``[B, L, N]`` when given."""

    latents: torch.Tensor
    image_counts: torch.Tensor
    image_attention_mask: torch.Tensor | None = None


class XAttnLayout(NamedTuple):
    """One call's latents per row ``[B, I·M, D]``, which of them each position may read ``[B, L, I·M]``, and
    whether a position reads any ``[B, L]``."""

    latents: torch.Tensor
    allowed: torch.Tensor
    sees_image: torch.Tensor


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned scale (as the Llama family and IDEFICS)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


class GatedCrossAttentionBlock(nn.Module):
    """One GATED XATTN-DENSE block: cross-attention to the latents and a SwiGLU FFW, each behind a tanh gate."""

    def __init__(self, dim: int, heads: int, intermediate: int, activation: str, eps: float, alpha_init: float,
                 bridge: "GatedXAttnBridge", key: str, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"gated_xattn: width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm = RMSNorm(dim, eps)
        kv_dim = kv_dim or dim  # the latents' width (the resampler's output)
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(kv_dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(kv_dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.ff_norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)
        self.act = ACT2FN[activation]
        self.alpha_attn = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.alpha_ff = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.__dict__["bridge"] = bridge  # referenced for the running call, not registered
        self.key = key
        # the latents' keys and values for one prompt state, kept from the first call of its run (a forward, or a
        # generate run's prefill) until the bridge's release_caches: (XAttnPrompt, keys, values) or None
        self.__dict__["kv_cache"] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        call = self.bridge.call
        layout: XAttnLayout | None = call.state if call is not None else None
        if layout is not None:
            keys, values = self.keys_values(call.prompt, layout.latents)  # [B, H, I·M, d]
            batch, length, _ = hidden.shape
            queries = self.q_proj(self.attn_norm(hidden)).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            attended = nn.functional.scaled_dot_product_attention(
                queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=layout.allowed[:, None])
            attended = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))  # [B, L, D]
            attended = attended * layout.sees_image[..., None].to(attended.dtype)  # no image yet: nothing read
            hidden = hidden + torch.tanh(self.alpha_attn).to(hidden.dtype) * attended.to(hidden.dtype)
        normed = self.ff_norm(hidden)
        dense = self.down_proj(self.act(self.gate_proj(normed)) * self.up_proj(normed))
        return hidden + torch.tanh(self.alpha_ff).to(hidden.dtype) * dense.to(hidden.dtype)

    def keys_values(self, prompt: XAttnPrompt, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents' keys and values ``[B, H, S, d]``, computed once per prompt state (once per ``generate``)."""
        if self.kv_cache is None or self.kv_cache[0] is not prompt:
            batch, slots, _ = latents.shape
            shape = (batch, slots, self.heads, self.head_dim)
            self.__dict__["kv_cache"] = (prompt, self.k_proj(latents).view(shape).transpose(1, 2),
                                         self.v_proj(latents).view(shape).transpose(1, 2))
        return self.kv_cache[1], self.kv_cache[2]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the decoder layer this block precedes."""
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}


class GatedXAttnBridge(FusionBridge):
    """Resampler + gated cross-attention blocks in front of the chosen decoder layers (module docstring)."""

    def __init__(self, cfg: GatedXAttnConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(projector_of(cfg.resampler, in_dim, out_dim))
        if cfg.attend not in ATTEND:
            raise ValueError(f"gated_xattn: attend must be one of {ATTEND}, got {cfg.attend!r}")
        self.cfg = cfg
        self.marker_embeddings = nn.Embedding(2, out_dim)  # 0: <image>, 1: <|endofchunk|>
        self.blocks = nn.ModuleDict()  # str(layer index) → GatedCrossAttentionBlock
        self.chunk_token_id: int | None = None

    def num_tokens(self, grid: FeatureGrid) -> int:
        return 1  # each <image> is one ordinary token

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return None  # the marker has no place in the image

    def processor_needs(self) -> ProcessorNeeds:
        """The resampler's (a video as one media, for the Perceiver's temporal embeddings) and the chunk token."""
        return dataclasses.replace(self.projector.processor_needs(), chunk_token=self.cfg.chunk_token)

    def _attach(self, llm: nn.Module) -> None:
        config = llm.config
        self.chunk_token_id = llm.add_tokens([self.cfg.chunk_token])[0] if self.cfg.chunk_token else None
        with torch.no_grad():  # start from the mean of the LLM's rows, as a resized embedding would
            self.marker_embeddings.weight.copy_(llm.model.get_input_embeddings().weight.float().mean(0))
        heads = self.cfg.heads or config.num_attention_heads
        intermediate = self.cfg.intermediate_size or config.intermediate_size
        eps = getattr(config, "rms_norm_eps", 1e-6)
        activation = getattr(config, "hidden_act", "silu")
        decoder_layers = llm.decoder_layers()
        kv_dim = getattr(self.projector, "output_dim", llm.hidden_size)
        for index in selected_layers(llm, self.cfg.layers, self.cfg.every, where="gated_xattn"):
            block = GatedCrossAttentionBlock(llm.hidden_size, heads, intermediate, activation, eps,
                                             self.cfg.alpha_init, self, key=str(index), kv_dim=kv_dim)
            self.blocks[str(index)] = block
            decoder_layers[index].register_forward_pre_hook(block.pre_hook, with_kwargs=True)

    # -- the sequence -----------------------------------------------------------------------------
    def embed_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_mask: torch.Tensor,
                     image_tokens: torch.Tensor, prompt: XAttnPrompt | None = None) -> torch.Tensor:
        """Write the bridge's own ``<image>`` and ``<|endofchunk|>`` embeddings into ``embeds`` ``[B, L, D]``; the
        latents reach the LLM through cross-attention. With IDEFICS' ``image_attention_mask`` in the prompt the
        images fill per-row slots rather than one per ``<image>``."""
        slots = int(image_mask.sum())
        slots_given = prompt is not None and prompt.image_attention_mask is not None
        if image_tokens.shape[0] != slots and not slots_given:
            raise ValueError(f"input_ids hold {slots} <image> token(s) but {image_tokens.shape[0]} image(s) were given")
        chunk_mask = input_ids == self.chunk_token_id if self.chunk_token_id is not None else torch.zeros_like(image_mask)
        markers = chunk_mask.long()  # 0 at <image>, 1 at <|endofchunk|>
        replace = (image_mask | chunk_mask).unsqueeze(-1)
        return torch.where(replace, self.marker_embeddings(markers).to(embeds.dtype), embeds)

    def prompt_state(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_tokens: torch.Tensor | None,
                     image_attention_mask: torch.Tensor | None = None) -> XAttnPrompt | None:
        """The prompt's latents and each row's image count (None without images): what decoding steps read."""
        if image_tokens is None or image_tokens.shape[0] == 0:
            return None
        return XAttnPrompt(image_tokens, image_mask.sum(-1), image_attention_mask)

    def call_state(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                   prompt: XAttnPrompt | None) -> XAttnLayout | None:
        """Which latents each position of this call reads (φ, or IDEFICS' mask); None when no row holds an image."""
        if prompt is None:
            return None
        if prompt.image_attention_mask is not None:
            return self.idefics_layout(prompt.latents, prompt.image_attention_mask, image_mask.shape[1])
        return self.phi_layout(prompt.latents, image_mask, prompt.image_counts)

    def release_caches(self) -> None:
        """Drop every block's keys and values of the latest prompt's latents."""
        for block in self.blocks.values():
            block.__dict__["kv_cache"] = None

    def idefics_layout(self, latents: torch.Tensor, image_attention_mask: torch.Tensor, length: int) -> XAttnLayout:
        """The layout transformers' IDEFICS takes instead of φ: ``image_attention_mask`` ``[B, L, N]`` (1 where a
        position reads image slot ``n`` of its row; padded slots hold any pixels and are never read) and latents
        for ``B·N`` slots. Generated positions read as the mask's last row (as transformers' ``generate`` extends it)."""
        batch, rows, slots = image_attention_mask.shape
        mask = image_attention_mask.bool()
        if rows > length:  # a cached decoding step: the new positions read as the last one
            mask = mask[:, -1:, :].expand(batch, length, slots)
        elif rows < length:  # the prompt and the tokens generated since, which read as its last position
            mask = torch.cat([mask, mask[:, -1:, :].expand(batch, length - rows, slots)], dim=1)
        if latents.shape[0] != batch * slots:
            raise ValueError(f"image_attention_mask has {slots} image slot(s) per row for {batch} row(s) but "
                             f"{latents.shape[0]} image(s) were given")
        per_image = latents.shape[1]
        sees_image = mask.any(-1)  # [B, L]
        allowed = (mask | ~sees_image[..., None]).repeat_interleave(per_image, dim=-1)  # [B, L, N·M]
        return XAttnLayout(latents.reshape(batch, slots * per_image, -1), allowed, sees_image)

    def phi_layout(self, latents: torch.Tensor, image_mask: torch.Tensor, counts: torch.Tensor) -> XAttnLayout:
        """Flamingo's φ: each position reads the last image at or before it (``attend: all_previous``: every image
        so far). ``counts`` ``[B]``: each row's images in the whole sequence (a decoding step sees none itself)."""
        batch, length = image_mask.shape
        if int(counts.sum()) != latents.shape[0]:
            raise ValueError(f"the sequences hold {int(counts.sum())} <image> tokens but {latents.shape[0]} "
                             f"image(s) were given")
        most, per_image = int(counts.max()), latents.shape[1]
        first = torch.cumsum(counts, 0) - counts  # [B], index of each row's first image
        slot = torch.arange(most, device=latents.device)
        valid = slot[None] < counts[:, None]  # [B, I]
        index = (first[:, None] + slot[None]).clamp(max=latents.shape[0] - 1)
        padded = latents[index] * valid[..., None, None].to(latents.dtype)  # [B, I, M, D]
        in_call = image_mask.sum(-1)  # [B]
        phi = (counts - in_call)[:, None] + image_mask.long().cumsum(-1)  # [B, L]: 1-based last image, 0 none
        image_number = slot[None, None] + 1  # [1, 1, I]
        if self.cfg.attend == "last":
            allowed = image_number == phi[..., None]
        else:
            allowed = (image_number <= phi[..., None]) & valid[:, None]
        sees_image = phi > 0  # [B, L]
        allowed = allowed | ~sees_image[..., None]  # rows that see nothing attend anywhere; their output is zeroed
        allowed = allowed.repeat_interleave(per_image, dim=-1)  # [B, L, I·M]
        return XAttnLayout(padded.reshape(batch, most * per_image, -1), allowed, sees_image)

    # -- reporting --------------------------------------------------------------------------------
    def step_report(self) -> dict[str, Any]:
        """|tanh(α)| per block, attention and dense gates, for the training log."""
        def gate(parameter: torch.Tensor) -> float:
            return float(torch.tanh(parameter.detach()).abs().mean())

        return {"gates": {"layers": [int(key) for key in self.blocks],
                          "attn": [gate(block.alpha_attn) for block in self.blocks.values()],
                          "dense": [gate(block.alpha_ff) for block in self.blocks.values()]}}

    def write_plots(self, records: list[dict], directory: str, number: int, name: str) -> list[str]:
        """Flamingo's gate figure (``gates-<number>-<name>.png``) from the stage's step records."""
        if not any("gates" in record for record in records):
            return []
        return [plot_gates(records, os.path.join(directory, f"gates-{number}-{name}.png"),
                           title=f"stage {number} '{name}'")]


@BRIDGES.register("gated_xattn", GatedXAttnConfig)
def build_gated_xattn(cfg: GatedXAttnConfig, in_dim: int, out_dim: int) -> GatedXAttnBridge:
    return GatedXAttnBridge(cfg, in_dim, out_dim)
