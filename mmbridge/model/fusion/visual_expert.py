"""``visual_expert``: CogVLM's visual expert (Wang et al., "CogVLM: Visual Expert for Pretrained Language
Models", arXiv 2311.03079).

In every chosen decoder layer, positions that hold visual tokens use their own attention
projections (QKV and the output projection) and their own FFN, initialised as copies of the
layer's; text positions use the frozen originals. Attention stays joint over the whole
sequence: image keys/values and text keys/values meet in the same softmax. The visual tokens
come from a SwiGLU adapter (``projector``, CogVLM's choice). All visual tokens of one image
share one position id and the text after it continues from there (``shared_positions``), in
training and in generation. Only the experts and the projector hold trainable weights.

The experts act through forward hooks on the layer's own ``q_proj``/``k_proj``/``v_proj``/
``o_proj``/``mlp``: the original computes every position, the expert recomputes the visual
positions and its result replaces them. Text positions are therefore untouched by
construction (their hidden states are bit-identical to the base LLM's until they attend to an
image), LoRA (peft) on the same projections keeps working, and decode steps — text only —
skip the experts. The cost is the original's work on visual positions, done and discarded.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES
from mmbridge.model.fusion.base import (FusionBridge, projector_of, selected_layers, shared_image_positions,
                                        submodule)


@dataclass
class VisualExpertConfig:
    """``modules``: the submodules of each decoder layer that get an expert (paths inside the layer);
    ``layers``: which decoder layers (None: all); ``shared_positions``: one position id per image."""

    type: str = "visual_expert"
    projector: Any = field(default_factory=lambda: {"type": "swiglu"})
    layers: list[int] | None = None
    modules: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.o_proj", "mlp"])
    shared_positions: bool = True


class LayerExperts(nn.Module):
    """One decoder layer's experts, keyed by the last part of the module path (``q_proj``, ``mlp``…)."""

    def __init__(self, originals: dict[str, nn.Module], bridge: "VisualExpertBridge") -> None:
        super().__init__()
        self.experts = nn.ModuleDict({name: copy.deepcopy(module) for name, module in originals.items()})
        self.__dict__["bridge"] = bridge  # referenced for the running call, not registered

    def route(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: the expert's output replaces the original's at this call's visual positions."""
        call = self.bridge.call
        index = call.image_positions if call is not None else None
        if index is None:
            return None
        inputs = args[0]  # [B, L, D_in]
        if inputs.shape[:2] != call.image_mask.shape:
            raise RuntimeError(f"visual expert {name}: input {tuple(inputs.shape)} does not line up with the "
                               f"image mask {tuple(call.image_mask.shape)}")
        expert_output = self.experts[name](inputs[index])  # [n_visual, D_out]
        return output.index_put(index, expert_output.to(output.dtype))


class VisualExpertBridge(FusionBridge):
    """Projector + per-layer experts for visual positions (see the module docstring)."""

    def __init__(self, cfg: VisualExpertConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(projector_of(cfg.projector, in_dim, out_dim))
        if not cfg.modules:
            raise ValueError("visual_expert: 'modules' is empty; name at least one layer submodule (e.g. mlp)")
        keys = [path.rsplit(".", 1)[-1] for path in cfg.modules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"visual_expert: modules {cfg.modules} end in the same name twice")
        self.cfg = cfg
        self.layers = nn.ModuleDict()  # str(layer index) → LayerExperts

    def _attach(self, llm: nn.Module) -> None:
        decoder_layers = llm.decoder_layers()
        for index in selected_layers(llm, self.cfg.layers, where="visual_expert"):
            originals = {path.rsplit(".", 1)[-1]: submodule(decoder_layers[index], path, index, "visual_expert")
                         for path in self.cfg.modules}
            experts = LayerExperts(originals, self)
            self.layers[str(index)] = experts
            for name, module in originals.items():
                module.register_forward_hook(functools.partial(experts.route, name))

    def position_ids(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                     tokens_per_image: int) -> torch.Tensor | None:
        """CogVLM's positions (one per image) when ``shared_positions``; None: the model's default."""
        if not self.cfg.shared_positions:
            return None
        return shared_image_positions(image_mask, attention_mask, tokens_per_image)

    def inactive_parameters_per_token(self) -> int:
        """A token runs either the experts or the originals they copy: one of the two sets is idle."""
        return sum(parameter.numel() for parameter in self.layers.parameters())


@BRIDGES.register("visual_expert", VisualExpertConfig)
def build_visual_expert(cfg: VisualExpertConfig, in_dim: int, out_dim: int) -> VisualExpertBridge:
    return VisualExpertBridge(cfg, in_dim, out_dim)
