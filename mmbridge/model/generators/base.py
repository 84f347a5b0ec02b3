"""The generator interface: what a model that answers with images (NExT-GPT, arXiv 2309.05519) calls.

A :class:`Generator` is a frozen conditional generator (Stable Diffusion through diffusers, or a small one trained
here) that turns a conditioning ``[B, L, W]`` into images. NExT-GPT's output projection maps the LLM's signal
tokens to exactly that conditioning, and trains it against two targets this interface provides:

* :meth:`Generator.encode_text`: the generator's own text encoding of the caption (``[B, L, W]``), the target of
  NExT-GPT's per-token l2 loss;
* :meth:`Generator.denoising_loss`: the frozen generator's noise-prediction loss on the caption's image, with
  Min-SNR-γ weighting (Hang et al. 2023, arXiv 2303.09556; γ = 5 as NExT-GPT's newer code), whose gradient reaches
  only the conditioning.

A generator is not an ``nn.Module`` of the mmbridge model: the model only refers to it, its weights never train
and are never saved with the model (a saved model stores :meth:`Generator.export_config`, e.g. the pipeline's
path), and it moves with its own :meth:`Generator.to`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from mmbridge.registry import Registry

if TYPE_CHECKING:
    from PIL import Image

GENERATORS: Registry["Generator"] = Registry("generator")
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023; NExT-GPT's newer code


@dataclass
class TextConditioning:
    """A generator's own encoding of captions: ``embeds [B, L, W]`` and, per caption, whether its text encoder
    truncated it (a caption longer than ``L`` tokens loses its tail: the flag says so, never silently)."""

    embeds: torch.Tensor  # [B, L, W]
    truncated: list[bool]


class Generator(abc.ABC):
    """A frozen generator called with conditioning ``[B, L, W]``; subclasses set the attributes below."""

    modality: str  # what it generates: "image"
    condition_length: int  # L: conditioning tokens per item (SD-1.5: 77)
    condition_width: int  # W: width of each (SD-1.5: 768)
    image_size: int  # the side (px) of what it draws by default, and of the images its denoising loss reads

    def check_conditioning(self, length: int, width: int) -> None:
        """A ``ValueError`` naming both shapes unless conditioning ``[length, width]`` per item is what this
        generator takes (the model side calls it at build, so a mismatch is found before step 1)."""
        if (int(length), int(width)) != (self.condition_length, self.condition_width):
            raise ValueError(f"conditioning of [L, W] = [{length}, {width}] per item does not fit this {self.modality} "
                             f"generator, which takes [L, W] = [{self.condition_length}, {self.condition_width}]")

    def check_call(self, conditioning: torch.Tensor, name: str = "conditioning") -> None:
        """A ``ValueError`` naming both shapes unless ``conditioning`` is ``[B, L, W]`` of this generator's L, W."""
        if conditioning.dim() != 3 or tuple(conditioning.shape[1:]) != (self.condition_length, self.condition_width):
            raise ValueError(f"{name} has shape {list(conditioning.shape)}; this {self.modality} generator takes "
                             f"[B, {self.condition_length}, {self.condition_width}] ([B, L, W])")

    @abc.abstractmethod
    def encode_text(self, texts: list[str]) -> TextConditioning:
        """The generator's own conditioning for ``texts`` (``[B, L, W]``) and which of them were truncated."""

    @abc.abstractmethod
    def generate(self, conditioning: torch.Tensor, *, steps: int = 50, guidance_scale: float = 7.5,
                 seed: int | None = None, height: int | None = None, width: int | None = None,
                 negative: torch.Tensor | None = None) -> list[Image.Image]:
        """One image per row of ``conditioning [B, L, W]``; ``negative`` (``[B or 1, L, W]``) is the
        classifier-free guidance's unconditional side; a private ``torch.Generator`` seeded with ``seed``."""

    @abc.abstractmethod
    def denoising_loss(self, conditioning: torch.Tensor, pixel_values: torch.Tensor,
                       generator: torch.Generator | None = None, *,
                       timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen generator's Min-SNR-weighted denoising loss (a scalar) of ``pixel_values [B, 3, H, W]`` in
        [-1, 1] under ``conditioning [B, L, W]``; gradients reach ``conditioning`` only."""

    @abc.abstractmethod
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Every weight of the generator (all frozen)."""

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> "Generator":
        """Move the generator to ``device`` (its dtype follows the device); returns ``self``."""

    @abc.abstractmethod
    def export_config(self) -> Any:
        """The config that rebuilds this generator (what a saved model stores instead of its weights)."""


def min_snr_weights(snr: torch.Tensor, prediction_type: str, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556) per sample from the signal-to-noise ratio
    ``snr = ᾱ_t / (1 - ᾱ_t)`` of its timestep ``[B]``: the x0-loss weight ``min(snr, γ)`` expressed for the target the
    network predicts: ``min(snr, γ) / snr`` for epsilon (written ``min(1, γ / snr)``, finite at snr = 0),
    ``min(snr, γ) / (snr + 1)`` for v-prediction, ``min(snr, γ)`` for the sample itself."""
    snr = snr.float()
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    if prediction_type == "sample":
        return snr.clamp(max=gamma)
    raise ValueError(f"unknown prediction_type '{prediction_type}'; known: epsilon, v_prediction, sample")


def check_generator(spec: Any) -> None:
    """Check a generator spec without loading any weights (preflight): its fields, then its config's ``check()``
    (every registered generator config has one: e.g. that a diffusers directory holds each component)."""
    GENERATORS.make_config(spec).check()


def build_generator(spec: Any) -> Generator:
    """Build a generator from a dict (``{"type": "diffusers", "path": ...}``) or a registered config."""
    return GENERATORS.build(spec)
