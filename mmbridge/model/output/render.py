"""From an answer's signal tokens to images: the conditioning of every complete run, then the modality's generator.

After decoding, the prompt and the answer go through the model once more (no cache, no gradient), so each run's
positions have their last hidden states; the output projection maps each run to the generator's conditioning
(:meth:`~mmbridge.model.output.side.ModalityOutput.conditioning`) and the frozen generator draws one image per run,
in the order the runs stand in the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class ImageSettings:
    """How a generator draws an answer's images: denoising ``steps``, classifier-free ``guidance_scale``, ``seed``
    (None: a random draw; a seed gives the same images again) and the size (None: the generator's own)."""

    steps: int = 30
    guidance_scale: float = 7.5
    seed: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"image steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"image {name} must be >= 8 px (or None), got {value}")


def run_conditioning(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_tokens: torch.Tensor | None = None,
                     image_attention_mask: torch.Tensor | None = None) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per output modality, ``(row, conditioning [queries, width])`` of every complete signal-token run of
    ``input_ids`` ``[B, L]`` (the prompt and its answer), in reading order."""
    found = {modality: output.runs(input_ids) for modality, output in model.output.modalities.items()}
    if not any(found.values()):
        return {}
    positions = model.position_ids(input_ids, attention_mask)
    with torch.no_grad():
        result = model(input_ids, attention_mask, image_tokens=image_tokens, position_ids=positions,
                       image_attention_mask=image_attention_mask, return_logits="none", return_hidden=True)
        embeds = model.embed(input_ids, image_tokens=image_tokens)  # the signal rows, as the LLM read them
        conditioning = {}
        for modality, runs in found.items():
            if runs:
                projected = model.output.modalities[modality].conditioning(result.hidden, embeds, runs)  # [n, Q, W]
                conditioning[modality] = [(row, projected[index]) for index, (row, _) in enumerate(runs)]
    return conditioning


def draw(model: Any, conditioning: dict[str, list[tuple[int, torch.Tensor]]], rows: int,
         settings: ImageSettings) -> list[list[Image.Image]]:
    """Each row's images, drawn by its modality's generator from the runs' conditioning (one image per run)."""
    images: list[list[Image.Image]] = [[] for _ in range(rows)]
    for modality, runs in conditioning.items():
        stacked = torch.stack([tensor for _, tensor in runs])  # [n, Q, W]
        generator = model.output.modalities[modality].generator_on(stacked.device)
        drawn = generator.generate(stacked, steps=settings.steps, guidance_scale=settings.guidance_scale,
                                   seed=settings.seed, height=settings.height, width=settings.width)
        for (row, _), image in zip(runs, drawn):
            images[row].append(image)
    return images
