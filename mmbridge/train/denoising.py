"""A text-to-image generator trained in the main trainer: the stage objective ``denoising``.

NExT-GPT answers with images through a diffusion model conditioned on a frozen text encoder; none can be
downloaded here, so this trains one: a diffusers ``UNet2DConditionModel`` that predicts the noise of DDPM
(epsilon prediction: a random timestep ``t``, Gaussian noise ``ε``, ``x_t = scheduler.add_noise(x_0, ε, t)``,
loss ``MSE(unet(x_t, t, c), ε)``), conditioned on the hidden states ``c`` of a frozen BERT (the bundled
all-MiniLM-L6-v2 by default) for each sample's caption. With probability ``caption_dropout`` a caption is replaced
by the empty prompt, so the model also learns the unconditional prediction that classifier-free guidance needs.

The run holds a :class:`GeneratorModel` under the usual module keys: ``vision`` — the VAE (by default the frozen
pixel VAE of :mod:`~mmbridge.train.pixel_vae`: the UNet denoises pixels), ``bridge`` — the UNet (trained),
``llm`` — the text encoder (frozen), ``output`` — empty. Data are what a generator is asked to draw
(:class:`GenerationProcessor`): a sample that answers with an image (its ``outputs``, e.g. MiniWorld's
``text_to_image`` and ``image_edit`` requests) trains on that image and its caption, not on the request; any other
sample is an image-caption pair read as BLIP-2 stage 1 reads it (its one image and first reply). The loss is
weighted per timestep by Min-SNR-γ (Hang et al. 2023; ``noise.min_snr_gamma``, 0 for the plain mean).
``output_dir/final`` is a ``StableDiffusionPipeline`` directory (``model_index.json``, ``unet``, ``vae``,
``scheduler`` = the sampler, ``text_encoder``, ``tokenizer`` whose ``model_max_length`` is the conditioning
length; no safety checker), which ``StableDiffusionPipeline.from_pretrained(DIR)`` loads and draws with from a
``prompt`` or from ``prompt_embeds`` ``[B, max_length, hidden]``::

    mmbridge train configs/miniworld_generator.yaml

Recipe ``model`` section (each part checked by preflight, unknown fields named)::

    vision: {type: pixels, image_size: 32}
    bridge: {type: unet, channels: [32, 64, 128], cross_attention: [false, true, true], layers_per_block: 1,
             attention_heads: 4, norm_groups: 8, ema_decay: 0.0}
    llm: {init_from: minilm, max_length: 32}
    noise: {timesteps: 1000, beta_schedule: squaredcos_cap_v2, caption_dropout: 0.1, sampler: ddpm,
            min_snr_gamma: 5.0}
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.data import SampleError
from mmbridge.data.formats.llava import Sample
from mmbridge.data.images import load_output_images
from mmbridge.model.bridges.base import StageHooks
from mmbridge.model.generators.base import min_snr_weights
from mmbridge.model.multimodal import parameter_counts
from mmbridge.model.vision.transform import ImageTransform
from mmbridge.registry import config_from_dict
from mmbridge.train.qformer_pretrain import CaptionProcessor, caption_of
from mmbridge.utils import make_shareable

VAE_TYPES = ("pixels",)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SAMPLERS = ("ddim", "ddpm", "dpm")  # the scheduler class final/ names: DDIM, DDPM, DPM-Solver++ (multistep)
MODEL_FIELDS = ("vision", "bridge", "llm", "noise")
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


# -- the recipe's model section --------------------------------------------------------------------
@dataclass
class VaeSpec:
    """``model.vision``: ``pixels`` — the frozen identity VAE (:func:`~mmbridge.train.pixel_vae.pixel_vae`); images
    are resized to ``image_size`` px and scaled to [-1, 1]."""

    type: str = "pixels"
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.type not in VAE_TYPES:
            raise ValueError(f"field 'type' must be one of {list(VAE_TYPES)}, got {self.type!r}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"field 'image_size' must be a multiple of 8 (at least 8), got {self.image_size}")


@dataclass
class UNetSpec:
    """``model.bridge``: a ``UNet2DConditionModel``, one down (and up) block per entry of ``channels``, with
    cross-attention to the caption where ``cross_attention`` says (one flag per block, outermost first); a block
    with cross-attention also attends over its own pixels unless ``self_attention`` (one flag per block, default
    all true) turns that off (diffusers' ``only_cross_attention``: the outermost block's self-attention over every
    pixel costs the most)."""

    type: str = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    cross_attention: list[bool] = field(default_factory=lambda: [False, True, True])
    self_attention: list[bool] | None = None
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_groups: int = 8
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.type != "unet":
            raise ValueError(f"field 'type' must be 'unet', got {self.type!r}")
        if not self.channels or len(self.cross_attention) != len(self.channels):
            raise ValueError(f"'cross_attention' needs one flag per entry of 'channels' ({len(self.channels)}), "
                             f"got {len(self.cross_attention)}")
        if self.self_attention is not None and len(self.self_attention) != len(self.channels):
            raise ValueError(f"'self_attention' needs one flag per entry of 'channels' ({len(self.channels)}), "
                             f"got {len(self.self_attention)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"field 'ema_decay' must lie in [0, 1) (0: no moving average), got {self.ema_decay}")
        if not any(self.cross_attention):
            raise ValueError("'cross_attention' must be true for at least one block: the caption enters there")
        bad = [width for width in self.channels if width % self.norm_groups or width % self.attention_heads]
        if bad:
            raise ValueError(f"every entry of 'channels' must be divisible by norm_groups ({self.norm_groups}) and "
                             f"attention_heads ({self.attention_heads}); {bad} are not")


@dataclass
class TextEncoderSpec:
    """``model.llm``: the frozen BERT whose last hidden states condition the UNet (``minilm``: the bundled
    all-MiniLM-L6-v2, or a BERT directory), over ``max_length`` tokens (the caption padded or truncated)."""

    init_from: str = "minilm"
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"field 'max_length' must be at least 2 ([CLS] and [SEP]), got {self.max_length}")


@dataclass
class NoiseSpec:
    """``model.noise``: the DDPM forward process (``timesteps``, ``beta_schedule``), the probability that a caption
    trains as the empty prompt (classifier-free guidance), the sampler ``final/`` names, and the γ of the Min-SNR
    loss weights (0: every timestep weighs the same)."""

    timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    caption_dropout: float = 0.1
    sampler: str = "ddpm"
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"field 'beta_schedule' must be one of {list(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"field 'sampler' must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"field 'caption_dropout' must lie in [0, 1), got {self.caption_dropout}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"field 'min_snr_gamma' must be >= 0 (0: no weighting), got {self.min_snr_gamma}")
        if self.timesteps < 2:
            raise ValueError(f"field 'timesteps' must be at least 2, got {self.timesteps}")


@dataclass
class GeneratorSpec:
    """A ``denoising`` run's ``model`` section, parsed."""

    vision: VaeSpec
    bridge: UNetSpec
    llm: TextEncoderSpec
    noise: NoiseSpec


def parse_generator_spec(model: Any) -> GeneratorSpec:
    """The recipe's ``model`` section of a ``denoising`` run; a ``ValueError`` naming ``recipe model.<key>`` and the
    field for anything wrong."""
    if not isinstance(model, dict):
        raise ValueError(f"recipe model must be a mapping, got {model!r}")
    unknown = sorted(set(model) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"recipe model: unknown field(s) {unknown} for objective 'denoising'; valid fields: "
                         f"{list(MODEL_FIELDS)} (vision: the VAE, bridge: the UNet, llm: the text encoder)")
    parts = {}
    for key, spec_class in (("vision", VaeSpec), ("bridge", UNetSpec), ("llm", TextEncoderSpec), ("noise", NoiseSpec)):
        where = f"recipe model.{key}"
        value = model.get(key) or {}
        try:
            parts[key] = config_from_dict(spec_class, value, where=where)
        except (ValueError, TypeError) as error:
            message = str(error)
            raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    return GeneratorSpec(**parts)


# -- the model ------------------------------------------------------------------------------------
class UNetBridge(StageHooks, nn.Module):
    """The trained part: the UNet, under ``bridge``, and with ``ema_decay`` > 0 an exponential moving average of
    its weights (``ema``: frozen, updated after every optimizer step, checkpointed; what ``final/`` samples with).
    The average's decay warms up as ``min(ema_decay, (1 + step) / (10 + step))`` (diffusers' ``EMAModel``), so
    the first steps' random weights fade fast."""

    def __init__(self, unet: nn.Module, ema_decay: float = 0.0) -> None:
        super().__init__()
        self.unet, self.ema_decay = unet, ema_decay
        self.ema = copy.deepcopy(unet).requires_grad_(False) if ema_decay else None

    def requires_grad_(self, requires_grad: bool = True) -> UNetBridge:
        """As ``nn.Module.requires_grad_``, the average staying frozen (``apply_stage`` trains the bridge)."""
        super().requires_grad_(requires_grad)
        if self.ema is not None:
            self.ema.requires_grad_(False)
        return self

    def after_update(self, step: int) -> None:
        """Move the average towards the UNet's weights after optimizer step ``step``."""
        if self.ema is None:
            return
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, weight in zip(self.ema.parameters(), self.unet.parameters()):
                average.lerp_(weight.detach(), 1.0 - decay)

    def tracked_parameters(self) -> list[str]:
        """The average's parameters (checkpointed with the UNet's)."""
        return [f"ema.{name}" for name, _ in self.ema.named_parameters()] if self.ema is not None else []

    @property
    def sampling_unet(self) -> nn.Module:
        """The UNet ``final/`` holds: the average when there is one."""
        return self.ema if self.ema is not None else self.unet

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The predicted noise ``[B, C, H, W]`` of ``noisy`` ``[B, C, H, W]`` at ``timesteps`` ``[B]`` given the
        caption's hidden states ``conditioning`` ``[B, L, D]``."""
        return self.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample


@dataclass
class DenoisingOutput:
    """The loss (mean squared error on the noise) and how many images it averages over."""

    loss: torch.Tensor
    images: int


class GeneratorModel(nn.Module):
    """A text-to-image diffusion model under the usual keys: ``vision`` (VAE), ``bridge`` (:class:`UNetBridge`),
    ``llm`` (BERT text encoder), ``output`` (empty)."""

    def __init__(self, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 spec: GeneratorSpec) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.vision, self.llm, self.output = vae, text_encoder, nn.Module()
        self.bridge = UNetBridge(unet, spec.bridge.ema_decay)
        self.tokenizer, self.spec = tokenizer, spec
        self.processor_settings: dict = {}  # the trainer records a stage's box_format here; final/ saves none
        # clip_sample off and steps_offset 1: what StableDiffusionPipeline rewrites a scheduler's config to (with a
        # warning) when it holds other values; "trailing" spacing starts sampling at the last timestep
        self.scheduler = DDPMScheduler(num_train_timesteps=spec.noise.timesteps, beta_schedule=spec.noise.beta_schedule,
                                       prediction_type="epsilon", clip_sample=False, steps_offset=1,
                                       timestep_spacing="trailing")
        empty = tokenizer("", padding="max_length", max_length=spec.llm.max_length, return_tensors="pt")
        self.register_buffer("empty_ids", empty["input_ids"][0], persistent=False)  # [L]: the unconditional prompt
        self.register_buffer("empty_mask", empty["attention_mask"][0], persistent=False)

    @property
    def max_length(self) -> int:
        """The conditioning length: every caption is padded (or truncated) to this many tokens."""
        return self.spec.llm.max_length

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``{key: {"trainable": n, "frozen": n}}`` for every module key."""
        return parameter_counts(self)

    def add_lora(self, key: str, spec: Any) -> None:
        raise ValueError("objective 'denoising' supports the tuning modes frozen, full and partial, not lora")

    def processor(self, max_length: int | None = None, box_format: str = "plain") -> GenerationProcessor:
        """The stage's examples (:class:`GenerationProcessor`): image-caption pairs, the caption in the text encoder's tokenizer (at most
        :attr:`max_length` tokens), the image at the generator's size in [-1, 1]."""
        if max_length is not None and max_length != self.max_length:
            raise ValueError(f"data max_length {max_length} differs from model.llm.max_length {self.max_length} "
                             f"(the conditioning length): remove it from data")
        size = self.spec.vision.image_size
        transform = ImageTransform(size=(size, size), resample="box", mean=(0.5,) * 3, std=(0.5,) * 3)
        return GenerationProcessor(self.tokenizer, transform, self.max_length, box_format)

    def conditioning(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states ``[B, L, D]`` for captions ``[B, T]`` (``T <= L``), padded to
        ``L`` = :attr:`max_length` as the pipeline's tokenizer pads them (its encoder reads the mask too)."""
        missing = self.max_length - input_ids.shape[1]
        if missing < 0:
            raise ValueError(f"captions of {input_ids.shape[1]} tokens exceed the conditioning length "
                             f"{self.max_length}")
        input_ids = nn.functional.pad(input_ids, (0, missing), value=int(self.tokenizer.pad_token_id))
        attention_mask = nn.functional.pad(attention_mask, (0, missing), value=0)
        trains = any(parameter.requires_grad for parameter in self.llm.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C, h, w]
        """The VAE's latents of images in [-1, 1], scaled as the pipeline unscales them (fp32, outside autocast)."""
        trains = any(parameter.requires_grad for parameter in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()), \
                torch.autocast(pixel_values.device.type, enabled=False):
            posterior = self.vision.encode(pixel_values.float()).latent_dist
            return posterior.sample() * self.vision.config.scaling_factor

    def denoising_loss(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The epsilon-prediction loss (Min-SNR-weighted mean over the images) for given noise ``[B, C, h, w]`` and timesteps ``[B]`` (a fixed evaluation
        batch passes its own; :meth:`forward` draws them)."""
        clean = self.latents(pixel_values)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        predicted = self.bridge(noisy, timesteps, self.conditioning(input_ids, attention_mask))
        errors = (predicted.float() - noise.float()).pow(2).flatten(1).mean(1)  # [B]
        gamma = self.spec.noise.min_snr_gamma
        if not gamma:
            return errors.mean()
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]  # [B]
        return (min_snr_weights(alphas / (1 - alphas), "epsilon", gamma) * errors).mean()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> DenoisingOutput:
        """DDPM's loss on a batch of images ``[B, 3, H, W]`` and captions ``[B, T]``: a timestep and noise drawn per
        image, and each caption replaced by the empty prompt with probability ``caption_dropout`` (torch's RNG,
        which the trainer seeds per micro-batch)."""
        batch = pixel_values.shape[0]
        input_ids, attention_mask = self._drop_captions(input_ids, attention_mask)
        shape = (batch, self.bridge.unet.config.in_channels, *self._latent_size(pixel_values))
        noise = torch.randn(shape, device=pixel_values.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=pixel_values.device)
        loss = self.denoising_loss(pixel_values, input_ids, attention_mask, noise, timesteps)
        return DenoisingOutput(loss=loss, images=batch)

    def _latent_size(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        factor = 2 ** (len(self.vision.config.block_out_channels) - 1)
        return pixel_values.shape[-2] // factor, pixel_values.shape[-1] // factor

    def _drop_captions(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions with a random ``caption_dropout`` share of rows replaced by the empty prompt, ``[B, L]``."""
        input_ids = nn.functional.pad(input_ids, (0, self.max_length - input_ids.shape[1]),
                                      value=int(self.tokenizer.pad_token_id))
        attention_mask = nn.functional.pad(attention_mask, (0, self.max_length - attention_mask.shape[1]), value=0)
        dropped = torch.rand(input_ids.shape[0], device=input_ids.device) < self.spec.noise.caption_dropout  # [B]
        input_ids = torch.where(dropped[:, None], self.empty_ids[None], input_ids)
        attention_mask = torch.where(dropped[:, None], self.empty_mask[None], attention_mask)
        return input_ids, attention_mask

    def pipeline(self) -> Any:
        """The model as a ``StableDiffusionPipeline`` (sharing its modules; the UNet's moving average when there
        is one) with the recipe's sampler."""
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

        sampler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}[
            self.spec.noise.sampler]
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.model_max_length = self.max_length
        # pixels live in [-1, 1]: each step's prediction of the clean image is clipped to it (dynamic thresholding
        # with a maximum of 1; StableDiffusionPipeline turns clip_sample off but keeps thresholding)
        scheduler = sampler.from_config(self.scheduler.config, thresholding=self.spec.vision.type == "pixels",
                                        sample_max_value=1.0)
        return StableDiffusionPipeline(vae=self.vision, text_encoder=self.llm, tokenizer=tokenizer,
                                       unet=self.bridge.sampling_unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, directory: str) -> None:
        """``output_dir/final``: a ``StableDiffusionPipeline`` directory, written beside ``directory`` and renamed
        into place (an older one is replaced)."""
        save_pipeline(self.pipeline(), directory)


class GenerationProcessor(CaptionProcessor):
    """A sample → a ``denoising`` example ``{"id", "input_ids": [T], "pixel_values": [1, 3, H, W]}``: what the
    sample asks to draw when it answers with an image (its one output's target and caption), else its image and
    caption as :class:`~mmbridge.train.qformer_pretrain.CaptionProcessor` reads them."""

    def caption(self, sample: Sample) -> str:
        """:func:`generation_caption`."""
        return generation_caption(sample)

    def load_images(self, sample: Sample) -> list:
        """The output's target image (from the sample's ``output_loader``, else the file its ``image`` names), or
        for a sample without outputs its own image."""
        if not sample.outputs:
            return super().load_images(sample)
        return load_output_images(sample)


def generation_caption(sample: Sample) -> str:
    """The caption a ``denoising`` example of ``sample`` is conditioned on: the caption of the image it answers
    with (a :class:`SampleError` when it answers with several), else its first reply (one image needed)."""
    if not sample.outputs:
        return caption_of(sample)
    if len(sample.outputs) != 1:
        raise SampleError(f"sample {sample.id!r} answers with {len(sample.outputs)} images; objective 'denoising' "
                          f"trains on samples that answer with one", sample.id, "output_count")
    return sample.outputs[0]["caption"]


def save_pipeline(pipeline: Any, directory: str) -> None:
    """Write ``pipeline`` (safetensors) to ``directory`` through a staging directory renamed into place."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.")
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        make_shareable(staging)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


# -- building ------------------------------------------------------------------------------------
def build_unet(spec: UNetSpec, image_size: int, channels: int, cross_attention_dim: int) -> nn.Module:
    """A ``UNet2DConditionModel`` for ``channels``-channel latents of ``image_size`` px."""
    from diffusers import UNet2DConditionModel

    down = [CROSS_DOWN if cross else PLAIN_DOWN for cross in spec.cross_attention]
    up = [CROSS_UP if cross else PLAIN_UP for cross in reversed(spec.cross_attention)]
    only_cross = tuple(not flag for flag in spec.self_attention) if spec.self_attention is not None else False
    return UNet2DConditionModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                block_out_channels=tuple(spec.channels), layers_per_block=spec.layers_per_block,
                                norm_num_groups=spec.norm_groups, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=spec.attention_heads, only_cross_attention=only_cross)  # diffusers' legacy name: the head count


def build_generator_model(model: dict) -> GeneratorModel:
    """The ``denoising`` run's model of a recipe's ``model`` section: the VAE, a fresh UNet, the frozen text
    encoder and its tokenizer (UNet weights drawn from torch's RNG: the trainer seeds it first)."""
    from transformers import AutoTokenizer, BertModel

    from mmbridge.model.bridges.qformer import resolve_init_dir
    from mmbridge.train.pixel_vae import pixel_vae

    spec = parse_generator_spec(model)
    directory = resolve_init_dir(spec.llm.init_from)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text_encoder = BertModel.from_pretrained(directory)  # with its pooler, so the pipeline reloads every weight
    text_encoder.config.use_attention_mask = True  # the pipeline then passes the tokenizer's mask, as training does
    vae = pixel_vae(spec.vision.image_size)
    unet = build_unet(spec.bridge, spec.vision.image_size, vae.config.latent_channels, text_encoder.config.hidden_size)
    return GeneratorModel(vae, unet, text_encoder.eval(), tokenizer, spec)


def spec_dict(spec: GeneratorSpec) -> dict:
    """The spec as the recipe writes it."""
    return dataclasses.asdict(spec)
