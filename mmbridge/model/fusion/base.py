"""Bridges that live inside the LLM: the base class, and the helpers every fusion family shares.

A fusion bridge is an input-token bridge (its ``projector``: any registered bridge spec, which
makes the visual tokens spliced at ``<image>`` positions) plus modules that act inside the
frozen LLM's decoder layers. It keeps the contract of ``DESIGN.md`` ("bridges inside the LLM"):

1. *Names.* Every weight it adds is a parameter of the bridge (``bridge.…``). It reaches into
   the LLM through forward hooks on the decoder's own submodules, or, where the original
   computation must be skipped, a wrapper that adopts the original module's children under
   their own names and refers to the bridge's modules without registering them. The ``llm.…``
   parameter names and tensors stay those of the HF model.
2. *Identity at init.* Experts are copies, adapters have zero output projections: a fresh
   model gives the base LLM's logits on text-only input.
3. *One forward, one generate.* Per-call data is one :class:`~mmbridge.model.bridges.base.FusionCall`
   (:attr:`FusionBridge.call`, set by :meth:`MultimodalModel.forward` for the duration of the LLM's
   forward), which modules only read: ``image_mask`` ``[B, L]``, ``attention_mask``, the bridge's
   prompt state (:meth:`~mmbridge.model.bridges.base.Bridge.prompt_state`, made once per ``forward`` or
   once per ``generate`` run and passed to the prefill and every step) and its call state
   (:meth:`~mmbridge.model.bridges.base.Bridge.call_state`). What a module keeps across calls lives on the
   module, with its lifetime stated where it is kept. A bridge that keeps each ``<image>`` as one token
   (gated cross-attention) overrides :meth:`~mmbridge.model.bridges.base.Bridge.embed_images`.
4. *Same tools.* Recipes, stages, the feature cache (features go through :meth:`forward`, the
   projector), the eval harness and save/load need nothing special.

:attr:`~mmbridge.model.bridges.base.Bridge.fuses_into_llm` tells the decoder's fast path (which calls the
layers outside the model's forward, without a call) to stay off.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import Bridge, FusionCall, ProcessorNeeds, build_bridge
from mmbridge.model.grid import FeatureGrid


class FusionBridge(Bridge, abc.ABC):
    """A ``projector`` for the visual tokens plus parts inside the LLM, added by :meth:`attach`."""

    fuses_into_llm = True

    def __init__(self, projector: Bridge) -> None:
        super().__init__()
        self.projector = projector
        self.__dict__["llm"] = None  # the LanguageModel adapter; referenced, never registered (its weights are llm.…)

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.projector.num_tokens(grid)

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return self.projector.token_grid(grid)

    def grid_divisor(self) -> int:
        return self.projector.grid_divisor()

    def processor_needs(self) -> ProcessorNeeds:
        return self.projector.processor_needs()

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, M, D]
        return self.projector(features, grid, inputs)

    # -- inside the LLM -------------------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        """Create the parts inside ``llm`` (a :class:`~mmbridge.model.llm.base.LanguageModel`); once per model."""
        if self.llm is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to an LLM")
        self.__dict__["llm"] = llm
        self._attach(llm)

    @abc.abstractmethod
    def _attach(self, llm: nn.Module) -> None:
        """Build the modules that act inside ``llm``'s decoder layers and hook them in."""

    @property
    def call(self) -> FusionCall | None:
        """The running call (None outside the LLM's forward, e.g. in the decoder's fast path)."""
        return self.llm.context if self.llm is not None else None


def selected_layers(llm: nn.Module, layers: list[int] | None, every: int = 1, where: str = "bridge") -> list[int]:
    """Indices of the decoder layers a bridge acts in: ``layers`` if given (negatives count from the end),
    else every ``every``-th layer from the first."""
    count = len(llm.decoder_layers())
    if layers is None:
        if every < 1:
            raise ValueError(f"{where}: 'every' must be >= 1, got {every}")
        return list(range(0, count, every))
    chosen = []
    for index in layers:
        if not -count <= index < count:
            raise ValueError(f"{where}: layer {index} does not exist; the LLM has {count} decoder layers")
        chosen.append(index % count)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{where}: layers {layers} name a layer twice")
    return sorted(chosen)


def submodule(layer: nn.Module, name: str, index: int, where: str) -> nn.Module:
    """``layer.<name>`` with an error that names the layer and what it does have."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        known = sorted(child for child, _ in layer.named_modules() if child)
        raise ValueError(f"{where}: decoder layer {index} ({type(layer).__name__}) has no submodule {name!r}; "
                         f"it has {known[:12]}") from None


def projector_of(spec: Any, in_dim: int, out_dim: int) -> Bridge:
    """The input-token bridge a fusion bridge's ``projector`` field names."""
    built = build_bridge(spec, in_dim, out_dim)
    if built.fuses_into_llm:
        raise ValueError(f"a fusion bridge's projector must be an input-token bridge, got {type(built).__name__}")
    return built


def shared_image_positions(image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                           tokens_per_image: int) -> torch.Tensor:
    """Position ids ``[B, L]`` where all ``tokens_per_image`` tokens of one image share one position (CogVLM).

    Every attended text token and the first token of each image advance the position by one;
    left padding sits at 0. Consecutive images are told apart by the per-image token count.
    """
    attended = torch.ones_like(image_mask) if attention_mask is None else attention_mask.bool()
    image = image_mask & attended
    before = torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)  # image token at t - 1
    seen = image.long().cumsum(-1)  # image tokens up to and including t
    run_start = image & ~before
    start_count = torch.where(run_start, seen - 1, torch.zeros_like(seen)).cummax(-1).values
    index_in_run = seen - 1 - start_count  # 0, 1, 2… inside a run of image tokens
    first_of_image = image & (index_in_run % tokens_per_image == 0)
    advances = attended & (~image | first_of_image)
    return (advances.long().cumsum(-1) - 1).clamp(min=0)
