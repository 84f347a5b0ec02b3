"""``mma``: LaVIN's Mixture-of-Modality Adaptation (Luo et al., "Cheap and Quick: Efficient Vision-Language
Instruction Tuning for Large Language Models", arXiv 2305.15023).

Lightweight bottleneck adapters sit in the frozen LLM, on the input of each chosen layer's
attention and of its FFN (``sites``). Each is a mixture-of-modality adapter: one shared
down-projection ``D → rank`` and ``paths`` up-projections ``rank → D`` (zero-initialised, so
the model starts as the LLM), mixed per sample by a router:

    x' = x + scale · Σ_p w_p · up_p(down(x)),   w = softmax(router(t_m) / temperature)

``t_m`` is a learned modality token: one embedding for samples that hold an image and one
for text-only samples, so the router shifts each input between single- and multi-modal
paths. Whether a sample holds an image is read once from the prompt
(:meth:`MMABridge.prompt_state`) and kept while decoding. The adapters are linear (RepAdapter,
as LaVIN) and train end to end with the ``projector``; the paper's point is that the trainable
part is tiny (``mmbridge info`` and the trainer's stage table report it). LaVIN also places
adapters in the image encoder; here the encoder is the user's choice and stays as the stage
says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES
from mmbridge.model.bridges.mlp import default_projector
from mmbridge.model.fusion.base import FusionBridge, projector_of, selected_layers, submodule

TEXT_ONLY, WITH_IMAGE = 0, 1


@dataclass
class MMAConfig:
    """``sites``: layer submodules whose input is adapted; ``layers``: which decoder layers (None: all)."""

    type: str = "mma"
    projector: Any = field(default_factory=default_projector)
    rank: int = 8
    paths: int = 2
    temperature: float = 10.0  # LaVIN's router temperature
    scale: float = 1.0
    layers: list[int] | None = None
    sites: list[str] = field(default_factory=lambda: ["self_attn", "mlp"])


class ModalityAdapter(nn.Module):
    """One site's mixture-of-modality adapter: shared ``down``, ``paths`` zero-initialised ``up``s, a router."""

    def __init__(self, dim: int, cfg: MMAConfig, bridge: "MMABridge") -> None:
        super().__init__()
        self.down = nn.Linear(dim, cfg.rank)
        self.up = nn.ModuleList(nn.Linear(cfg.rank, dim) for _ in range(cfg.paths))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.router = nn.Linear(dim, cfg.paths)
        self.temperature, self.scale = cfg.temperature, cfg.scale
        self.__dict__["bridge"] = bridge  # referenced for the running call and modality tokens, not registered

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        weights = self.path_weights(hidden.shape[0])  # [B, P]
        bottleneck = self.down(hidden)  # [B, L, r]
        mixed = sum(weights[:, index, None, None] * up(bottleneck) for index, up in enumerate(self.up))
        return hidden + self.scale * mixed.to(hidden.dtype)

    def path_weights(self, batch: int) -> torch.Tensor:
        """Routing weights ``[B, P]`` from each sample's modality token."""
        call = self.bridge.call
        has_image = call.prompt if call is not None else None  # [B], the prompt state
        if has_image is None:  # called outside a MultimodalModel forward: text only
            has_image = torch.zeros(batch, dtype=torch.bool, device=self.down.weight.device)
        if has_image.shape[0] != batch:
            raise RuntimeError(f"mma: {has_image.shape[0]} modality flags for a batch of {batch}")
        tokens = self.bridge.modality(has_image.long())  # [B, D]
        return (self.router(tokens) / self.temperature).softmax(-1)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: adapt the site's input, passed positionally or as ``hidden_states=``."""
        if args:
            return (self.adapt(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.adapt(kwargs["hidden_states"])}


class MMABridge(FusionBridge):
    """Projector + mixture-of-modality adapters in the LLM (see the module docstring)."""

    def __init__(self, cfg: MMAConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(projector_of(cfg.projector, in_dim, out_dim))
        for name in ("rank", "paths"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"mma: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.temperature <= 0:
            raise ValueError(f"mma: temperature must be > 0, got {cfg.temperature}")
        if not cfg.sites:
            raise ValueError("mma: 'sites' is empty; name the layer submodules to adapt (e.g. self_attn, mlp)")
        self.cfg = cfg
        self.modality = nn.Embedding(2, out_dim)  # TEXT_ONLY, WITH_IMAGE
        nn.init.normal_(self.modality.weight, std=0.02)
        self.adapters = nn.ModuleDict()  # "<layer>_<site>" → ModalityAdapter

    def _attach(self, llm: nn.Module) -> None:
        decoder_layers = llm.decoder_layers()
        for index in selected_layers(llm, self.cfg.layers, where="mma"):
            for site in self.cfg.sites:
                module = submodule(decoder_layers[index], site, index, "mma")
                adapter = ModalityAdapter(llm.hidden_size, self.cfg, self)
                self.adapters[f"{index}_{site.replace('.', '_')}"] = adapter
                module.register_forward_pre_hook(adapter.pre_hook, with_kwargs=True)

    def prompt_state(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_tokens: torch.Tensor | None,
                     image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's modality, ``[B]`` (True: it holds an image), kept for every decoding step."""
        super().prompt_state(image_mask, attention_mask, image_tokens, image_attention_mask)  # refuses the IDEFICS mask
        return image_mask.any(-1)


@BRIDGES.register("mma", MMAConfig)
def build_mma(cfg: MMAConfig, in_dim: int, out_dim: int) -> MMABridge:
    return MMABridge(cfg, in_dim, out_dim)
