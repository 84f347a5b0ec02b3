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
each block computes the latents' keys and values once per ``generate`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.model.bridges.base import BRIDGES
from mmbridge.model.fusion.base import FusionBridge, projector_of, selected_layers

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
        self.__dict__["bridge"] = bridge  # referenced for the call's context, not registered
        self.key = key

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        layout = self.bridge.layout(hidden.shape[0], hidden.shape[1])
        if layout is not None:
            keys, values = self.keys_values(layout["latents"])  # [B, H, I·M, d]
            batch, length, _ = hidden.shape
            queries = self.q_proj(self.attn_norm(hidden)).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            attended = nn.functional.scaled_dot_product_attention(
                queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=layout["allowed"][:, None])
            attended = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))  # [B, L, D]
            attended = attended * layout["sees_image"][..., None].to(attended.dtype)  # no image yet: nothing read
            hidden = hidden + torch.tanh(self.alpha_attn).to(hidden.dtype) * attended.to(hidden.dtype)
        normed = self.ff_norm(hidden)
        dense = self.down_proj(self.act(self.gate_proj(normed)) * self.up_proj(normed))
        return hidden + torch.tanh(self.alpha_ff).to(hidden.dtype) * dense.to(hidden.dtype)

    def keys_values(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents' keys and values ``[B, H, S, d]``, computed once per call (once per ``generate``)."""
        memo = self.bridge.context.setdefault("xattn_memo", {})
        if self.key not in memo:
            batch, slots, _ = latents.shape
            shape = (batch, slots, self.heads, self.head_dim)
            memo[self.key] = (self.k_proj(latents).view(shape).transpose(1, 2),
                              self.v_proj(latents).view(shape).transpose(1, 2))
        return memo[self.key]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the decoder layer this block precedes."""
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}


class GatedXAttnBridge(FusionBridge):
    """Resampler + gated cross-attention blocks in front of the chosen decoder layers (module docstring)."""

    splices_tokens = False  # visual tokens reach the LLM through cross-attention, not through the sequence

    def __init__(self, cfg: GatedXAttnConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(projector_of(cfg.resampler, in_dim, out_dim))
        if cfg.attend not in ATTEND:
            raise ValueError(f"gated_xattn: attend must be one of {ATTEND}, got {cfg.attend!r}")
        self.cfg = cfg
        self.marker_embeddings = nn.Embedding(2, out_dim)  # 0: <image>, 1: <|endofchunk|>
        self.blocks = nn.ModuleDict()  # str(layer index) → GatedCrossAttentionBlock
        self.chunk_token_id: int | None = None

    def num_tokens(self, num_features: int) -> int:
        return 1  # each <image> is one ordinary token

    @property
    def takes_video(self) -> bool:
        """Whether a video's frames reach the resampler together (the Perceiver's temporal embeddings)."""
        return bool(getattr(self.projector, "takes_video", False))

    @property
    def max_frames(self) -> int | None:
        return getattr(self.projector, "max_frames", None)

    def latents_per_image(self, num_features: int) -> int:
        return self.projector.num_tokens(num_features)

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
    def embed_markers(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Write the bridge's own ``<image>`` and ``<|endofchunk|>`` embeddings into ``embeds`` ``[B, L, D]``."""
        chunk_mask = input_ids == self.chunk_token_id if self.chunk_token_id is not None else torch.zeros_like(image_mask)
        markers = chunk_mask.long()  # 0 at <image>, 1 at <|endofchunk|>
        replace = (image_mask | chunk_mask).unsqueeze(-1)
        return torch.where(replace, self.marker_embeddings(markers).to(embeds.dtype), embeds)

    def decode_context(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                       image_tokens: torch.Tensor | None) -> dict[str, Any]:
        """What decoding steps keep: the latents, each row's image count, and the keys/values memo."""
        return {"visual_tokens": image_tokens, "image_counts": image_mask.sum(-1), "xattn_memo": {}}

    def idefics_layout(self, latents: torch.Tensor, image_attention_mask: torch.Tensor,
                       length: int) -> dict[str, torch.Tensor]:
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
        return {"latents": latents.reshape(batch, slots * per_image, -1), "allowed": allowed,
                "sees_image": sees_image}

    def layout(self, batch: int, length: int) -> dict[str, torch.Tensor] | None:
        """This call's latents per row ``[B, I·M, D]``, which of them each position may read ``[B, L, I·M]``,
        and whether it reads any ``[B, L]``; None when no row holds an image. Computed once per call."""
        context = self.context
        if "xattn_layout" in context:
            return context["xattn_layout"]
        latents, image_mask = context.get("visual_tokens"), context.get("image_mask")
        layout = None
        if latents is not None and latents.shape[0] > 0 and context.get("image_attention_mask") is not None:
            layout = self.idefics_layout(latents, context["image_attention_mask"], length)
        elif latents is not None and latents.shape[0] > 0 and image_mask is not None:
            layout = self._build_layout(latents, image_mask, context.get("image_counts"))
        context["xattn_layout"] = layout
        return layout

    def _build_layout(self, latents: torch.Tensor, image_mask: torch.Tensor,
                      counts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch, length = image_mask.shape
        in_call = image_mask.sum(-1)  # [B]
        counts = in_call if counts is None else counts  # images per row in the whole sequence
        if int(counts.sum()) != latents.shape[0]:
            raise ValueError(f"the sequences hold {int(counts.sum())} <image> tokens but {latents.shape[0]} "
                             f"image(s) were given")
        most, per_image = int(counts.max()), latents.shape[1]
        first = torch.cumsum(counts, 0) - counts  # [B], index of each row's first image
        slot = torch.arange(most, device=latents.device)
        valid = slot[None] < counts[:, None]  # [B, I]
        index = (first[:, None] + slot[None]).clamp(max=latents.shape[0] - 1)
        padded = latents[index] * valid[..., None, None].to(latents.dtype)  # [B, I, M, D]
        phi = (counts - in_call)[:, None] + image_mask.long().cumsum(-1)  # [B, L]: 1-based last image, 0 none
        image_number = slot[None, None] + 1  # [1, 1, I]
        if self.cfg.attend == "last":
            allowed = image_number == phi[..., None]
        else:
            allowed = (image_number <= phi[..., None]) & valid[:, None]
        sees_image = phi > 0  # [B, L]
        allowed = allowed | ~sees_image[..., None]  # rows that see nothing attend anywhere; their output is zeroed
        allowed = allowed.repeat_interleave(per_image, dim=-1)  # [B, L, I·M]
        return {"latents": padded.reshape(batch, most * per_image, -1), "allowed": allowed, "sees_image": sees_image}

    # -- reporting --------------------------------------------------------------------------------
    def step_report(self) -> dict[str, Any]:
        """|tanh(α)| per block, attention and dense gates, for the training log."""
        def gate(parameter: torch.Tensor) -> float:
            return float(torch.tanh(parameter.detach()).abs().mean())

        return {"gates": {"layers": [int(key) for key in self.blocks],
                          "attn": [gate(block.alpha_attn) for block in self.blocks.values()],
                          "dense": [gate(block.alpha_ff) for block in self.blocks.values()]}}


@BRIDGES.register("gated_xattn", GatedXAttnConfig)
def build_gated_xattn(cfg: GatedXAttnConfig, in_dim: int, out_dim: int) -> GatedXAttnBridge:
    return GatedXAttnBridge(cfg, in_dim, out_dim)
