"""Compute accounting per image: crops, LLM tokens and encoder/bridge FLOPs for an image size and a strategy.

FLOPs are counted by running the encoder and the bridge once per distinct crop shape under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, as PyTorch counts them: one
multiply-add is 2 FLOPs). Modules built on the ``meta`` device are counted without computing anything,
so the accounting of a ViT-L/14-336 runs in a second (``benchmarks/highres_compute.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmbridge.model.highres.base import VISUAL, Crop, HighResStrategy


@dataclass
class ImageCost:
    """What one image of ``image_size`` (height, width) costs: encoder crops, LLM positions (visual tokens plus
    separators) and FLOPs of the encoder and of the bridge."""

    image_size: tuple[int, int]
    crops: int
    visual_tokens: int
    separator_tokens: int
    encoder_flops: int
    bridge_flops: int

    @property
    def llm_tokens(self) -> int:
        return self.visual_tokens + self.separator_tokens


def image_cost(vision: nn.Module, bridge: nn.Module, strategy: HighResStrategy | None,
               image_size: tuple[int, int]) -> ImageCost:
    """The :class:`ImageCost` of one image for an encoder, a bridge and a high-resolution strategy (or None: one
    crop at the encoder's size, whatever the image's size)."""
    if strategy is None:
        crops = [Crop(tuple(vision.transform.output_size))]
        tokens = [VISUAL] * int(bridge.num_tokens(vision.feature_layout()))
    else:
        layout = strategy.layout(image_size)
        crops, tokens = layout.crops, layout.tokens
    groups: dict[tuple, list[Crop]] = {}  # one count per distinct shape (and tile adapter)
    for crop in crops:
        groups.setdefault((crop.size, strategy.adapter_key(crop) if strategy else None), []).append(crop)
    encoder_flops = bridge_flops = 0
    for members in groups.values():
        crop_encoder, crop_bridge = _crop_flops(vision, bridge, strategy, members[0])
        encoder_flops += len(members) * crop_encoder
        bridge_flops += len(members) * crop_bridge
    visual = sum(1 for token in tokens if token == VISUAL)
    return ImageCost(tuple(image_size), len(crops), visual, len(tokens) - visual, encoder_flops, bridge_flops)


def _crop_flops(vision: nn.Module, bridge: nn.Module, strategy: HighResStrategy | None,
                crop: Crop) -> tuple[int, int]:
    """FLOPs of the encoder (with the crop's tile adapter) and of the bridge on one crop."""
    parameter = next(vision.parameters(), None)
    device = (parameter if parameter is not None else next(bridge.parameters())).device
    pixels = torch.zeros(1, 3, *crop.size, device=device)
    context = strategy.encoder_context(strategy.adapter_key(crop)) if strategy else contextlib.nullcontext()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter, context:
            features = _detached_call(vision, pixels)  # [1, N, D_v]
        encoder = counter.get_total_flops()
        grid = vision.feature_layout(*crop.size)
        with FlopCounterMode(display=False) as counter:
            _detached_call(bridge, features, grid)
    return int(encoder), int(counter.get_total_flops())


def _detached_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with its parameters swapped for detached views: FlopCounterMode's module
    tracker puts backward hooks on inputs that require grad, which parameters fed to a sub-module (a resampler's
    latents) do even under ``no_grad``; nobody's ``requires_grad`` flag changes."""
    detached = {name: parameter.detach() for name, parameter in module.named_parameters()}
    return torch.func.functional_call(module, detached, args, kwargs)


def cost_table(rows: list[tuple[str, ImageCost]], baseline: ImageCost | None = None) -> str:
    """A plain-text table of :class:`ImageCost` rows (labels first); ``baseline`` adds a column of encoder FLOPs
    relative to it."""
    header = f"{'strategy':<22}{'image (h×w)':>13}{'crops':>7}{'visual':>8}{'sep':>6}{'encoder FLOPs':>15}" \
             f"{'bridge FLOPs':>14}" + ("   vs base" if baseline else "")
    lines = [header]
    for label, cost in rows:
        ratio = f"{cost.encoder_flops / baseline.encoder_flops:>9.2f}×" if baseline and baseline.encoder_flops else ""
        lines.append(f"{label:<22}{cost.image_size[0]:>6}×{cost.image_size[1]:<6}{cost.crops:>7}{cost.visual_tokens:>8}"
                     f"{cost.separator_tokens:>6}{format_flops(cost.encoder_flops):>15}{format_flops(cost.bridge_flops):>14}"
                     + (f"  {ratio}" if baseline else ""))
    return "\n".join(lines)


def format_flops(flops: float) -> str:
    """``1.23 G``-style text for a FLOP count."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f}"
