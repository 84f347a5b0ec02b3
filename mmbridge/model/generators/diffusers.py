"""Image generators through diffusers: any ``StableDiffusionPipeline``-format directory, frozen.

NExT-GPT (arXiv 2309.05519) calls Stable Diffusion with the output projection's ``prompt_embeds`` instead of a
prompt, so no tokenizer is needed to generate; the pipeline's own text encoder gives the alignment target
(:meth:`DiffusersGenerator.encode_text`, exactly ``pipeline.encode_prompt``) and its UNet the optional denoising
loss with Min-SNR-γ weighting (Hang et al. 2023, arXiv 2303.09556; γ = 5).

Recipe: ``generator: {type: diffusers, path: DIR, modality: image}``. ``DIR`` is loaded offline
(``local_files_only``); its text encoder may be any transformers model its ``model_index.json`` names (CLIP for
SD-1.5, a BERT for the MiniWorld generator), as long as the tokenizer's ``model_max_length`` (which sets the
conditioning length L) is set and the encoder's width equals the UNet's cross-attention width W.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from mmbridge.model.generators.base import GENERATORS, Generator, TextConditioning, min_snr_weights

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

PIPELINE_CLASSES = ("StableDiffusionPipeline",)  # pipelines that make an image from prompt_embeds alone
REQUIRED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
MODALITIES = ("image",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_CONDITION_LENGTH = 100_000  # a tokenizer's model_max_length above this is transformers' "unset" (1e30)


@dataclass
class DiffusersGeneratorConfig:
    """A diffusers pipeline directory. ``dtype``: ``auto`` (float32 on CPU, bfloat16 on a GPU that has it, else
    float16) or one of float32, float16, bfloat16."""

    type: str = "diffusers"
    path: str = ""
    modality: str = "image"
    dtype: str = "auto"

    def check(self) -> None:
        """What can be known before loading (a recipe's preflight): the directory and each component's files."""
        check_pipeline_dir(self.path)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for config value ``name`` on ``device`` (``auto``: fp32 on CPU)."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"generator dtype '{name}' is unknown; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _expected_files(library: str, class_name: str) -> list[tuple[str, ...]]:
    """Files a component folder must hold, as groups of alternatives (the first of each is the one named)."""
    if class_name.endswith("Scheduler"):
        return [("scheduler_config.json",)]
    if "Tokenizer" in class_name:
        return [("tokenizer_config.json",)]
    if "Processor" in class_name or "FeatureExtractor" in class_name:
        return [("preprocessor_config.json",)]
    if library == "diffusers":
        return [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                   "diffusion_pytorch_model.safetensors.index.json")]
    return [("config.json",), ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                               "pytorch_model.bin.index.json")]


def _read_model_index(path: str) -> dict:
    """``DIR/model_index.json`` as a dict; a ``ValueError`` when ``path`` is not a diffusers pipeline directory."""
    if not os.path.isdir(path):
        raise ValueError(f"generator path {path} is not a directory (a diffusers pipeline directory is expected)")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ValueError(f"{path} is not a diffusers pipeline directory: it has no model_index.json")
    try:
        with open(index_file, encoding="utf-8") as handle:
            model_index = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{index_file} is not valid JSON ({error}); not a diffusers pipeline directory") from None
    if not isinstance(model_index, dict) or "_class_name" not in model_index:
        raise ValueError(f"{index_file} has no '_class_name': not a diffusers pipeline directory")
    return model_index


def check_pipeline_dir(path: str) -> dict:
    """Check that ``path`` is a loadable image-from-prompt-embeds pipeline before diffusers reads it: one clear
    ``ValueError`` naming the missing component and the file expected. Returns its ``model_index.json``."""
    model_index = _read_model_index(path)
    class_name = model_index["_class_name"]
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{path}: pipeline class {class_name} (model_index.json) does not make an image from "
                         f"prompt_embeds; the diffusers generator takes: {', '.join(PIPELINE_CLASSES)}")
    for name in REQUIRED_COMPONENTS:
        entry = model_index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ValueError(f"{path}: model_index.json names no '{name}' component; the generator needs "
                             f"{', '.join(REQUIRED_COMPONENTS)}")
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        for alternatives in _expected_files(*entry):
            if not any(os.path.isfile(os.path.join(path, name, file)) for file in alternatives):
                expected = os.path.join(path, name, alternatives[0])
                raise ValueError(f"{path}: component '{name}' ({entry[1]}) is missing: expected {expected}")
    return model_index


def load_pipeline(path: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load ``path`` offline as a frozen ``StableDiffusionPipeline`` in eval mode, without progress bars."""
    from diffusers import StableDiffusionPipeline

    check_pipeline_dir(path)
    with _quiet_pipeline(loading=True):  # checked above; a BERT text encoder is no surprise, nor worth a bar
        pipeline = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipeline


class DiffusersGenerator(Generator):
    """A frozen ``StableDiffusionPipeline``: conditioning ``[B, L, W]`` with L the tokenizer's ``model_max_length``
    and W the UNet's cross-attention width (SD-1.5: 77 × 768)."""

    def __init__(self, pipeline: StableDiffusionPipeline, config: DiffusersGeneratorConfig) -> None:
        from diffusers import DDPMScheduler

        self.pipeline = pipeline
        self.config = config
        self.modality = config.modality
        # the training form of the pipeline's noise schedule (same betas and prediction type), as diffusers'
        # training scripts use: Euler-type schedulers' add_noise scales by sigma for inference, not for this loss
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self._empty_prompt: torch.Tensor | None = None  # [1, L, W], the encoding of "" (made when first needed)
        self.condition_length, self.condition_width = self._conditioning_shape()

    def _conditioning_shape(self) -> tuple[int, int]:
        """(L, W) from the tokenizer and the UNet; a ``ValueError`` when the text encoder does not fit the UNet."""
        path, max_length = self.config.path, self.pipeline.tokenizer.model_max_length
        if not isinstance(max_length, int) or max_length > MAX_CONDITION_LENGTH:
            raise ValueError(f"{path}/tokenizer: model_max_length is unset ({max_length}); set it in "
                             "tokenizer_config.json: it sets the conditioning length L")
        positions = getattr(self.pipeline.text_encoder.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions < max_length:
            raise ValueError(f"{path}/tokenizer: model_max_length {max_length} exceeds the text encoder's "
                             f"max_position_embeddings {positions}")
        unet_config = self.pipeline.unet.config
        width = unet_config.encoder_hid_dim or unet_config.cross_attention_dim
        empty = self.encode_text([""]).embeds  # [1, L, W_text]
        if empty.dim() != 3 or tuple(empty.shape[1:]) != (max_length, width):
            raise ValueError(f"{path}: the text encoder ({type(self.pipeline.text_encoder).__name__}) encodes a prompt "
                             f"as {list(empty.shape)}; the UNet takes [B, {max_length}, {width}] (model_max_length, "
                             "cross_attention_dim)")
        self._empty_prompt = empty
        return max_length, width

    @property
    def image_size(self) -> int:
        """The side (px) it draws at by default: the UNet's sample size times the VAE's scale factor."""
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def encode_text(self, texts: list[str]) -> TextConditioning:
        """``pipeline.encode_prompt(texts)`` (no guidance, one image per prompt): ``[B, L, W]`` in the generator's
        dtype, exactly the pipeline's own, plus which captions the tokenizer truncated to L tokens."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text needs at least one text")
        tokenizer = self.pipeline.tokenizer
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False).input_ids]
        with torch.no_grad(), _quiet_pipeline():  # truncation is reported in the result, once, not logged per call
            embeds, _ = self.pipeline.encode_prompt(texts, self.device, 1, False)
        return TextConditioning(embeds, [length > tokenizer.model_max_length for length in lengths])

    def _negative(self, batch: int, negative: torch.Tensor | None) -> torch.Tensor:
        """The unconditional side of guidance, ``[batch, L, W]``: ``negative`` (``[1 or batch, L, W]``), or, as
        Stable Diffusion's own classifier-free guidance, the encoding of the empty prompt."""
        if negative is None:
            if self._empty_prompt is None:
                self._empty_prompt = self.encode_text([""]).embeds
            negative = self._empty_prompt
        self.check_call(negative, "negative")
        if negative.shape[0] not in (1, batch):
            raise ValueError(f"negative has {negative.shape[0]} rows; the conditioning has {batch} (give 1 or {batch})")
        return negative.detach().to(self.device, self.dtype).expand(batch, -1, -1)

    def generate(self, conditioning: torch.Tensor, *, steps: int = 50, guidance_scale: float = 7.5,
                 seed: int | None = None, height: int | None = None, width: int | None = None,
                 negative: torch.Tensor | None = None) -> list[Image.Image]:
        """One RGB image per row of ``conditioning [B, L, W]``: the pipeline called with ``prompt_embeds`` and
        ``negative_prompt_embeds`` (default: the empty prompt's encoding), ``steps`` denoising steps and a private
        CPU ``torch.Generator`` seeded with ``seed`` (a fresh random seed when None; the global RNG is untouched).
        ``height``/``width``: multiples of 8, default the UNet's sample size × the VAE's scale factor."""
        self.check_call(conditioning)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        random = torch.Generator("cpu")
        if seed is None:
            random.seed()
        else:
            random.manual_seed(seed)
        output = self.pipeline(prompt_embeds=conditioning.detach().to(self.device, self.dtype),
                               negative_prompt_embeds=self._negative(conditioning.shape[0], negative),
                               num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                               generator=random, output_type="pil")
        return list(output.images)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` of each timestep ``[B]`` under the training schedule."""
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return alphas_cumprod / (1 - alphas_cumprod)

    def denoising_loss(self, conditioning: torch.Tensor, pixel_values: torch.Tensor,
                       generator: torch.Generator | None = None, *,
                       timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Min-SNR-γ-weighted (γ = 5) mean squared error of the frozen UNet's prediction for ``pixel_values
        [B, 3, H, W]`` (in [-1, 1]) under ``conditioning [B, L, W]``; a float32 scalar whose gradient reaches the
        conditioning only. Draws from ``generator`` in this order: the VAE posterior sample (scaled by the VAE's
        scaling factor), the noise, the timesteps (uniform over the training steps; ``timesteps [B]`` fixes them).
        Target: the noise, the velocity or the latents, by the scheduler's ``prediction_type``."""
        self.check_call(conditioning)
        latents = self._latents(pixel_values, conditioning.shape[0], generator)  # [B, C, h, w]
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      generator=generator, device=generator.device if generator else "cpu")
        timesteps = timesteps.to(self.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        targets = {"epsilon": lambda: noise, "sample": lambda: latents,
                   "v_prediction": lambda: self.noise_scheduler.get_velocity(latents, noise, timesteps)}
        weights = min_snr_weights(self.snr(timesteps), prediction_type)  # [B]; a ValueError for unknown types
        prediction = self.pipeline.unet(noisy, timesteps, encoder_hidden_states=conditioning.to(self.dtype)).sample
        squared_error = (prediction.float() - targets[prediction_type]().float()).pow(2)  # [B, C, h, w]
        return (squared_error.mean(dim=(1, 2, 3)) * weights).mean()

    def _latents(self, pixel_values: torch.Tensor, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """The VAE's scaled latents ``[B, C, h, w]`` of ``pixel_values [B, 3, H, W]`` in [-1, 1] (no gradient)."""
        if pixel_values.dim() != 4 or pixel_values.shape[0] != batch or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; expected [{batch}, 3, H, W] "
                             "(one RGB image per conditioning row)")
        low, high = pixel_values.min().item(), pixel_values.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(f"pixel_values must lie in [-1, 1] (the VAE's range); got values in "
                             f"[{low:.3f}, {high:.3f}]")
        vae = self.pipeline.vae
        with torch.no_grad():
            latents = vae.encode(pixel_values.to(self.device, self.dtype)).latent_dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                yield from component.parameters()

    def to(self, device: torch.device | str) -> "DiffusersGenerator":
        """Move to ``device`` in the dtype the config gives there (``auto``: float32 on CPU)."""
        device = torch.device(device)
        self.pipeline = self.pipeline.to(device=device, dtype=resolve_dtype(self.config.dtype, device))
        self._empty_prompt = None
        return self

    def export_config(self) -> DiffusersGeneratorConfig:
        return self.config


@GENERATORS.register("diffusers", DiffusersGeneratorConfig)
def build_diffusers_generator(cfg: DiffusersGeneratorConfig) -> DiffusersGenerator:
    """Load ``cfg.path`` (offline, frozen, eval) on the CPU; ``.to(device)`` moves it."""
    if cfg.modality not in MODALITIES:
        raise ValueError(f"diffusers generator modality '{cfg.modality}' is not supported; "
                         f"known: {', '.join(MODALITIES)}")
    if not cfg.path:
        raise ValueError("diffusers generator needs 'path': a StableDiffusionPipeline directory")
    cfg = dataclasses.replace(cfg, path=os.path.abspath(cfg.path))
    pipeline = load_pipeline(cfg.path, resolve_dtype(cfg.dtype, torch.device("cpu")))
    return DiffusersGenerator(pipeline, cfg)


@contextlib.contextmanager
def _quiet_pipeline(loading: bool = False) -> Iterator[None]:
    """diffusers' and transformers' per-call warnings off (the truncation warning of every encode_prompt call);
    ``loading``: their loading progress bars too (a generator loads in a second)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    if loading:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if loading and bars[0]:
            diffusers_logging.enable_progress_bar()
        if loading and bars[1]:
            transformers_logging.enable_progress_bar()
