"""MultimodalModel: vision encoder → bridge → spliced into the LLM's input embeddings.

The forward pass takes the tensors transformers' ``LlavaForConditionalGeneration``
takes (``input_ids`` with ``<image>`` placeholders already expanded to the bridge's
token count, ``attention_mask``, ``pixel_values`` with one row per image in order of
appearance, ``labels``) and returns ``.logits`` and ``.loss``. The loss is computed
from hidden states at label positions only, so training never builds full-vocabulary
logits over image and prompt tokens.

With an encoder–decoder LLM (T5, as BLIP-2 FlanT5) the spliced sequence is the encoder's
input and the decoder produces the answer: ``labels`` are then the decoder's targets, and
``decoder_input_ids`` (or ``labels`` shifted right) its inputs — the tensors transformers'
``Blip2ForConditionalGeneration`` takes on that path.

Inputs are explicit: ``image_sizes`` ``[n_images, 2]`` (height, width; transformers' name, for a
high-resolution strategy) and ``bridge_inputs`` (:class:`~mmbridge.data.bridge_inputs.BridgeInputs`, per-image
extras such as an instruction-aware bridge's text) are named arguments of :meth:`MultimodalModel.forward`,
:meth:`~MultimodalModel.encode_images`, ``generate`` and ``chat``. transformers' own tensor layouts (IDEFICS'
``[B, N, 3, H, W]``, LLaVA-NeXT's padded crops, Fuyu's patch sequences, ``qformer_input_ids``) are converted by
the functions of :mod:`mmbridge.interop`. The model speaks to its bridge only through the hooks of
:class:`~mmbridge.model.bridges.base.Bridge`, whatever its kind.

A model may also answer with images (NExT-GPT): ``ModelConfig.output`` adds signal tokens and the projection of
their states to a generator's conditioning (:mod:`mmbridge.model.output`), under the module key ``output``.

Module keys are fixed: ``vision``, ``bridge``, ``llm``, ``output`` (stages, checkpoints and logs speak them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.data.processor import ImageTokens, ModelText, Processor, TextSettings, VideoSettings
from mmbridge.model import fusion  # noqa: F401  (registers the bridges that live inside the LLM)
from mmbridge.model.bridges import BRIDGES, Bridge, FusionCall, build_bridge
from mmbridge.model.highres import HIGHRES, HighResStrategy, build_highres
from mmbridge.model.highres.base import crop_features, tokens_from_features
from mmbridge.model.llm import LLMS, build_llm, load_tokenizer
from mmbridge.model.lora import LoraSpec, inject_lora
from mmbridge.model.output import OutputSide, OutputTargets, output_configs
from mmbridge.model.output.render import ImageSettings, draw, run_conditioning
from mmbridge.model.vision import VISION_ENCODERS, build_vision
from mmbridge.utils import atomic_write_json, atomic_path

MODULE_KEYS = ("vision", "bridge", "llm", "output")
CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "processor.json", "tokenizer"
BRIDGE_TOKENIZER_DIR = "bridge_tokenizer"  # the bridge's own text tokenizer (instruction-aware bridges)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` mask → position ids ``[B, L]``: real tokens count from 0, left padding sits at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)



def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{key: {"trainable": n, "frozen": n}}`` for every module key of ``model`` (any model trained under the
    keys: the multimodal model, BLIP-2 stage 1's Q-Former, the generator of objective ``denoising``)."""
    counts = {key: {"trainable": 0, "frozen": 0} for key in MODULE_KEYS}
    for name, parameter in model.named_parameters():
        counts[name.split(".", 1)[0]]["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    return counts

@dataclass
class ModelConfig:
    """What to build: three component specs (dicts with a ``type`` or registered configs).

    ``image_token_id`` pins the placeholder id (as an imported HF LLaVA does); when None,
    ``image_token`` is added to the tokenizer and the embeddings grow by one row.
    ``adapters`` records LoRA injections (``{"key": "llm", **LoraSpec}``) so a saved model
    is rebuilt with the same structure. ``highres`` names a high-resolution strategy
    (``{"type": "anyres", ...}``, :mod:`mmbridge.model.highres`) or None (one crop at the encoder's size).
    ``output`` (``{"image": {...}}``, :class:`~mmbridge.model.output.side.OutputModalityConfig` fields) makes the
    model answer with images too; None: text only.
    """

    vision: Any = None
    llm: Any = None
    bridge: Any = field(default_factory=lambda: {"type": "mlp", "depth": 2, "activation": "gelu"})
    image_token: str = "<image>"
    image_token_id: int | None = None
    adapters: list[dict] = field(default_factory=list)
    highres: Any = None
    output: Any = None

    def to_dict(self) -> dict:
        """JSON-able dict; component configs become dicts with their ``type``."""
        def plain(spec: Any) -> Any:
            return dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec
        return {"vision": plain(self.vision), "llm": plain(self.llm), "bridge": plain(self.bridge),
                "image_token": self.image_token, "image_token_id": self.image_token_id,
                "adapters": [dict(adapter) for adapter in self.adapters], "highres": plain(self.highres),
                "output": {modality: plain(spec) for modality, spec in self.output.items()} if self.output else None}


@dataclass
class MultimodalOutput:
    """``loss`` (mean over label tokens), ``logits`` (per ``return_logits``), ``cache``, ``num_label_tokens``;
    ``encoder_hidden`` (encoder–decoder LLMs) lets decoding steps reuse the encoded prompt.
    With labels and a fusion bridge: ``aux_losses`` (weighted terms already in ``loss``, e.g. MoE load
    balancing) and ``stats`` (counts to log, e.g. tokens per expert)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    num_label_tokens: int = 0
    encoder_hidden: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # the LLM's last hidden states [B, L, D], when asked for (return_hidden)


class MultimodalModel(nn.Module):
    """A vision encoder, a bridge and a language model under the keys ``vision``, ``bridge``, ``llm``, and the
    output side (``output``; empty for a model that writes only text)."""

    def __init__(self, vision: nn.Module, bridge: Bridge, llm: nn.Module, config: ModelConfig,
                 processor_settings: dict | None = None, highres: HighResStrategy | None = None,
                 output: OutputSide | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.llm = llm
        self.output = output if output is not None else OutputSide()
        self.highres = highres  # holds no parameters: what it adds lives under vision / bridge (attach)
        self.config = config
        self.processor_settings = dict(processor_settings or {})
        self.parameters_at_save: dict | None = None  # trainable/frozen counts per key when it was saved
        if config.image_token_id is None:
            config.image_token_id = llm.add_tokens([config.image_token])[0]
        self.image_token_id = int(config.image_token_id)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig | dict, tokenizer: Any = None,
                    processor_settings: dict | None = None) -> "MultimodalModel":
        """Build every component from its spec (pretrained weights where a spec names a path)."""
        if isinstance(config, dict):
            config = ModelConfig(**config)
        for name in ("vision", "llm"):
            if getattr(config, name) is None:
                raise ValueError(f"model config needs a '{name}' spec")
        config = dataclasses.replace(
            config, vision=VISION_ENCODERS.make_config(config.vision), llm=LLMS.make_config(config.llm),
            bridge=BRIDGES.make_config(config.bridge), adapters=list(config.adapters),
            highres=HIGHRES.make_config(config.highres) if config.highres else None,
            output=output_configs(config.output) or None)
        vision = build_vision(config.vision)
        llm = build_llm(config.llm) if tokenizer is None else LLMS.get(config.llm.type).build(config.llm, tokenizer)
        bridge = build_bridge(config.bridge, vision.feature_dim, llm.hidden_size)
        bridge.attach(llm)
        highres = None
        if config.highres is not None:
            if bridge.fuses_into_llm or llm.is_encoder_decoder:
                raise ValueError(f"high-resolution strategy {config.highres.type!r} feeds input-token bridges of "
                                 f"decoder-only LLMs; bridge {type(bridge).__name__} / this LLM are not supported")
            highres = build_highres(config.highres)
            highres.attach(vision, bridge, llm.tokenizer, llm.hidden_size)
        if config.output and llm.is_encoder_decoder:
            raise ValueError("an output side (signal tokens the LLM emits) needs a decoder-only LLM; this one is "
                             "encoder-decoder")
        model = cls(vision, bridge, llm, config, processor_settings, highres)
        model.output = OutputSide.build(config.output or {}, llm)  # its signal tokens come after the image token
        for adapter in config.adapters:
            spec = {k: v for k, v in adapter.items() if k != "key"}
            inject_lora(model.get_submodule(adapter["key"]), LoraSpec(**spec))
        return model.eval()

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """What the model can answer with besides text (``("image",)`` with an output side; empty otherwise);
        ``mmbridge serve`` reads it to refuse image answers from a text-only model."""
        return tuple(self.output.modalities)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens each ``<image>`` placeholder expands to (at the encoder's size; with a high-resolution
        strategy the count depends on each image: :meth:`image_token_ids`)."""
        return self.bridge.num_tokens(self.vision.feature_layout())

    def image_token_ids(self, image_size: tuple[int, int]) -> list[int]:
        """The ids one ``<image>`` of ``(height, width)`` pixels expands to: image-token slots for its visual tokens
        and, with some high-resolution strategies, literal separators between them."""
        if self.highres is None:
            return [self.image_token_id] * self.tokens_per_image
        return self.highres.token_ids(image_size, self.image_token_id)

    def processor(self, **overrides: Any) -> Processor:
        """The :class:`~mmbridge.data.processor.Processor` matching this model (tokenizer, transform, token count,
        what its bridge needs), with the saved settings and ``overrides`` (TextSettings fields, a stage's
        ``video_stride``)."""
        settings = {**self.processor_settings, **overrides}
        stride = settings.pop("video_stride", 1)
        needs = self.bridge.processor_needs()
        video = VideoSettings(as_media=needs.video_frames is not None, max_frames=needs.video_frames, stride=stride)
        model_text = ModelText(encoder_decoder=self.llm.is_encoder_decoder, chunk_token=needs.chunk_token,
                               bridge_tokenizer=needs.text_tokenizer,
                               signal_texts={modality: self.output.token_texts(modality)
                                             for modality in self.output_modalities},
                               target_sizes=self.output.target_sizes())
        image_tokens = ImageTokens(per_image=self.tokens_per_image, placeholder=self.config.image_token,
                                   token_id=self.image_token_id)
        return Processor(self.tokenizer, self.vision.transform, image_tokens, text_settings=TextSettings(**settings),
                         model_text=model_text, video_settings=video, highres=self.highres)

    def add_lora(self, key: str, spec: LoraSpec) -> None:
        """Inject LoRA into module ``key`` and record it in the config (used by stages with ``lora``)."""
        inject_lora(self.get_submodule(key), spec)
        self.config.adapters.append({"key": key, **spec.to_dict()})

    # -- images → visual tokens ------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      bridge_inputs: BridgeInputs | None = None) -> torch.Tensor:
        """``[n_images, 3, H, W]`` → visual tokens ``[n_images, M, D_llm]``.

        With a high-resolution strategy ``pixel_values`` are the crops of every image ``[n_crops, 3, H, W]``,
        ``image_sizes`` ``[n_images, 2]`` (height, width) is required, and the result is the images' visual tokens
        in order, ``[sum M_i, D]``. ``bridge_inputs`` holds per-image extras. The encoder runs without autograd
        when none of its parameters train.
        """
        if self.highres is not None:
            features = crop_features(self.highres, pixel_values, self._sizes(image_sizes), self._vision_features)
            return tokens_from_features(self.highres, features, image_sizes, self.bridge, bridge_inputs)
        self._no_sizes(image_sizes)
        features = self._vision_features(pixel_values)  # [n, N, D_v]
        grid = self.vision.feature_layout(*pixel_values.shape[-2:], count=features.shape[-2])
        return self.bridge(features, grid, bridge_inputs)  # [n, M, D]

    def bridge_features(self, image_features: torch.Tensor, image_sizes: torch.Tensor | None = None,
                        bridge_inputs: BridgeInputs | None = None) -> torch.Tensor:
        """Encoder outputs (a feature cache's) → visual tokens, as :meth:`encode_images` continues after the encoder.
        With a high-resolution strategy ``image_features`` are per crop ``[n_crops, N_max, D_v]`` (crops with fewer
        features right-padded) and ``image_sizes`` is required."""
        if self.highres is None:
            self._no_sizes(image_sizes)
            grid = self.vision.feature_layout(count=image_features.shape[-2])
            return self.bridge(image_features, grid, bridge_inputs)  # [n, M, D]
        features = self.highres.unpad_features(image_features, self._sizes(image_sizes))
        return tokens_from_features(self.highres, features, image_sizes, self.bridge, bridge_inputs)  # [sum M_i, D]

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's features ``[n, N, D_v]``, with autograd only when one of its parameters trains."""
        vision_trains = any(parameter.requires_grad for parameter in self.vision.parameters())
        with torch.set_grad_enabled(vision_trains and torch.is_grad_enabled()):
            return self.vision(pixel_values)  # [n, N, D_v]

    def _sizes(self, image_sizes: torch.Tensor | None) -> torch.Tensor:
        if image_sizes is None:
            raise ValueError(f"this model's high-resolution strategy ({self.config.highres.type}) needs image_sizes "
                             f"[n_images, 2] (height, width) with the crops; the processor's examples carry them")
        return image_sizes

    @staticmethod
    def _no_sizes(image_sizes: torch.Tensor | None) -> None:
        if image_sizes is not None:
            raise TypeError("image_sizes are for models with a high-resolution strategy (ModelConfig.highres); this "
                            "model encodes every image at its encoder's size")

    def visual_tokens(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                      image_sizes: torch.Tensor | None = None,
                      bridge_inputs: BridgeInputs | None = None) -> torch.Tensor | None:
        """The visual tokens of a call's images, from pixels or cached encoder features; None without images."""
        if image_features is not None and image_features.shape[0] > 0:
            return self.bridge_features(image_features, image_sizes, bridge_inputs)  # [n, M, D]
        if pixel_values is not None and pixel_values.shape[0] > 0:
            return self.encode_images(pixel_values, image_sizes, bridge_inputs)  # [n, M, D]
        return None

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_tokens: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
              bridge_inputs: BridgeInputs | None = None, prompt_state: Any = None) -> torch.Tensor:
        """Token embeddings with the visual tokens (of ``pixel_values``, or given) entered at the ``<image>``
        positions as the bridge enters them, ``[B, L, D]``; ``prompt_state`` as in :meth:`forward`."""
        if image_tokens is None:
            image_tokens = self.visual_tokens(pixel_values, image_sizes=image_sizes, bridge_inputs=bridge_inputs)
        image_mask = input_ids == self.image_token_id  # [B, L]
        embeds = self.llm.embed_tokens(input_ids.masked_fill(image_mask, 0))  # [B, L, D]
        if self.output.modalities:  # signal tokens' embeddings are the output side's, not the LLM's rows
            embeds = self.output.embed(input_ids, embeds)
        if image_tokens is None:
            slots = int(image_mask.sum())
            if slots:
                raise ValueError(f"input_ids hold {slots} <image> token positions but no pixel_values were given")
            return embeds
        return self.bridge.embed_images(input_ids, embeds, image_mask, image_tokens, prompt_state)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                image_tokens: torch.Tensor | None = None, return_logits: str = "all",
                image_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                bridge_inputs: BridgeInputs | None = None, image_attention_mask: torch.Tensor | None = None,
                prompt_state: Any = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden: torch.Tensor | None = None, output_captions: dict[str, list[str]] | None = None,
                output_targets: dict[str, torch.Tensor] | None = None,
                output_pixels: dict[str, torch.Tensor] | None = None,
                return_hidden: bool = False) -> MultimodalOutput:
        """LLaVA-compatible forward (and BLIP-2-FlanT5-compatible with an encoder–decoder LLM).

        ``return_logits``: ``"all"`` (``[B, L, V]``, as transformers), ``"last"`` (``[B, 1, V]``,
        for decoding) or ``"none"`` (training: only the loss). ``image_tokens`` may replace
        ``pixel_values`` with bridge outputs computed elsewhere (decoding); ``image_features``
        (``[n_images, N, D_v]``, vision-encoder outputs, e.g. from a feature cache) skip the
        encoder and go through the bridge. ``image_sizes`` ``[n_images, 2]`` (height, width) are what a
        high-resolution strategy reads; ``bridge_inputs`` the per-image extras of the bridge (e.g. the
        instruction of an instruction-aware Q-Former). ``image_attention_mask`` ``[B, L, N]`` says which of
        each row's ``N`` images each position reads (IDEFICS' layout for gated cross-attention, with
        ``pixel_values`` ``[B·N, 3, H, W]``), in place of the ``<image>`` tokens' φ. ``prompt_state``: the
        bridge's :meth:`~mmbridge.model.bridges.base.Bridge.prompt_state` of the prompt a decoding step continues
        (:meth:`prompt_state`); made from this call's own ids and images when not given.

        A model with an output side (``output``) trains its projection with ``labels`` and, per modality, the
        captions of the batch's signal-token runs in order (``output_captions``, encoded by the modality's
        generator) or their encodings (``output_targets`` ``[n_runs, queries, width]``): the loss then holds
        ``align_weight`` × the l2 distance as ``aux_losses[f"{modality}_align"]``; with a ``denoise_weight``, the
        runs' target images (``output_pixels`` ``[n_runs, 3, H, W]`` in [-1, 1]) add the frozen generator's
        denoising loss as ``aux_losses[f"{modality}_denoise"]``. ``return_hidden`` keeps the LLM's last hidden
        states (``output.hidden``).

        With an encoder–decoder LLM (T5, as BLIP-2 FlanT5) ``input_ids``/``attention_mask`` are the
        encoder's (visual tokens spliced in), the decoder reads ``decoder_input_ids`` (``labels``
        shifted right behind the start token when only labels are given), ``labels`` ``[B, T]`` are
        aligned with the decoder positions (no shift), logits are the decoder's, and
        ``encoder_hidden`` (``[B, L, D]``, from an earlier call's output) skips the encoder.
        """
        if return_logits not in ("all", "last", "none"):
            raise ValueError(f"return_logits must be 'all', 'last' or 'none', got {return_logits!r}")
        if image_tokens is None:
            image_tokens = self.visual_tokens(pixel_values, image_features, image_sizes, bridge_inputs)
        if self.llm.is_encoder_decoder:
            hidden, output = self._encoder_decoder_forward(input_ids, attention_mask, labels, image_tokens,
                                                           decoder_input_ids, decoder_attention_mask, encoder_hidden,
                                                           cache, use_cache)
        else:
            if decoder_input_ids is not None or decoder_attention_mask is not None or encoder_hidden is not None:
                raise TypeError("decoder_input_ids, decoder_attention_mask and encoder_hidden are for "
                                "encoder-decoder LLMs; this model's LLM is decoder-only")
            targets = OutputTargets(self.output.targets(output_captions, output_targets), output_pixels or {})
            hidden, output = self._decoder_forward(self._needs_ids(input_ids), attention_mask, labels, image_tokens,
                                                   image_attention_mask, prompt_state, position_ids, cache, use_cache,
                                                   targets)
        if return_logits == "all":
            output.logits = self.token_logits(hidden)
        elif return_logits == "last":
            output.logits = self.token_logits(hidden[:, -1:])
        if return_hidden:
            output.hidden = hidden
        return output

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        """The LLM head's logits, with the signal tokens' columns from the output side's own head rows."""
        logits = self.llm.logits(hidden)
        return self.output.logits(hidden, logits) if self.output.modalities else logits

    def _decoder_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         labels: torch.Tensor | None, image_tokens: torch.Tensor | None,
                         image_attention_mask: torch.Tensor | None, prompt_state: Any,
                         position_ids: torch.Tensor | None, cache: Any, use_cache: bool,
                         output_targets: OutputTargets) -> tuple[torch.Tensor, MultimodalOutput]:
        """A decoder-only LLM: embed (visual tokens entered), run the layers with this call's :class:`FusionCall`,
        the loss over ``labels`` (aligned with ``input_ids``) plus the bridge's and the output side's auxiliary
        terms."""
        image_mask = input_ids == self.image_token_id  # [B, L]
        own_prompt = prompt_state is None
        if own_prompt:
            prompt_state = self.bridge.prompt_state(image_mask, attention_mask, image_tokens, image_attention_mask)
        embeds = self.embed(input_ids, image_tokens=image_tokens, prompt_state=prompt_state)
        call = FusionCall(image_mask, attention_mask, prompt_state,
                          self.bridge.call_state(image_mask, attention_mask, prompt_state), labels is not None)
        if position_ids is None:
            position_ids = self.bridge.position_ids(image_mask, attention_mask, self.tokens_per_image)
        try:
            hidden, cache = self.llm(embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, use_cache=use_cache, context=call)
        finally:
            if own_prompt:  # this call made the prompt state: what modules kept for it ends here
                self.bridge.release_caches()
        output = MultimodalOutput(cache=cache)
        if labels is not None:  # labels align with input_ids: position t predicts the label at t + 1
            output.loss, output.num_label_tokens = self.target_loss(hidden[:, :-1], labels[:, 1:])
            output.aux_losses, output.stats = self.bridge.training_outputs(call)
            output.aux_losses.update(self.output.losses(input_ids, hidden, embeds, output_targets.conditioning,
                                                        output_targets.pixels))
            output.loss = output.loss + sum(output.aux_losses.values())
        return hidden, output

    def prompt_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_tokens: torch.Tensor | None = None,
                     image_attention_mask: torch.Tensor | None = None) -> Any:
        """What the bridge keeps from a prompt ``[B, L]`` and its encoded images for every call of one ``generate``
        run (None for bridges that keep nothing); the run ends with ``self.bridge.release_caches()``."""
        return self.bridge.prompt_state(input_ids == self.image_token_id, attention_mask, image_tokens,
                                        image_attention_mask)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, L]`` for a (left-padded) prompt: the bridge's (CogVLM: one per image) or the
        attention mask's running count."""
        positions = self.bridge.position_ids(input_ids == self.image_token_id, attention_mask, self.tokens_per_image)
        return positions if positions is not None else positions_from_mask(attention_mask)

    def _encoder_decoder_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                                 labels: torch.Tensor | None, image_tokens: torch.Tensor | None,
                                 decoder_input_ids: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                                 encoder_hidden: torch.Tensor | None, cache: Any,
                                 use_cache: bool) -> tuple[torch.Tensor, MultimodalOutput]:
        """BLIP-2 FlanT5: spliced prompt → encoder (unless ``encoder_hidden`` is given) → decoder hidden states
        ``[B, T, D]``, and the output with the loss over ``labels`` aligned with the decoder positions."""
        if encoder_hidden is None:
            embeds = self.embed(self._needs_ids(input_ids), image_tokens=image_tokens)
            encoder_hidden = self.llm.encode(embeds, attention_mask)  # [B, L, D]
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("an encoder-decoder LLM needs decoder_input_ids or labels (shifted right "
                                 "to make them)")
            decoder_input_ids = self.llm.decoder_start_ids(labels)
        hidden, cache = self.llm(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                                 cache=cache, use_cache=use_cache)
        output = MultimodalOutput(cache=cache, encoder_hidden=encoder_hidden)
        if labels is not None:
            output.loss, output.num_label_tokens = self.target_loss(hidden, labels)
        return hidden, output

    @staticmethod
    def _needs_ids(input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("MultimodalModel.forward needs input_ids (encoder-decoder decoding steps may pass "
                             "encoder_hidden instead)")
        return input_ids

    def target_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Cross-entropy of ``targets`` ``[B, T]`` against the logits of ``hidden`` ``[B, T, D]``, built only
        where a target is not ``IGNORE_INDEX`` (mean over those); returns the loss and their count."""
        keep = targets != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0:
            return hidden.sum() * 0.0, 0
        logits = self.token_logits(hidden[keep])  # [T, V]
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return loss, count

    # -- generation ----------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                 bridge_inputs: BridgeInputs | None = None, **settings: Any) -> torch.Tensor:
        """Decode new tokens (see :func:`mmbridge.generate.generate`); returns ``[B, new]`` ids."""
        from mmbridge.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        image_sizes=image_sizes, bridge_inputs=bridge_inputs, **settings)

    def render_media(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: torch.Tensor,
                     images: Any = None, settings: ImageSettings | None = None) -> list[list[Any]]:
        """Each row's images for prompts ``[B, L]`` and their answers ``new_tokens`` ``[B, T]``: every complete
        signal-token run's conditioning through its modality's generator (:mod:`mmbridge.model.output.render`);
        ``images`` are the prompts' images as ``generate`` took them."""
        full = torch.cat([input_ids, new_tokens], dim=1)  # [B, L + T]
        mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)
        image_tokens = images.visual_tokens(self) if images is not None else None
        conditioning = run_conditioning(self, full, mask, image_tokens,
                                        images.image_attention_mask if images is not None else None)
        return draw(self, conditioning, full.shape[0], settings or ImageSettings())

    def chat(self, prompt: str, images: list | None = None, history: list[dict] | None = None,
             **settings: Any) -> str:
        """Answer one user turn: PIL images (or paths) and text with ``<image>`` placeholders (added if missing).

        ``history`` holds earlier ``{"role", "content"}`` turns; ``images`` then are all the
        conversation's images, in order.
        """
        from mmbridge.generate import chat

        return chat(self, prompt, images or [], history=history, **settings)

    # -- reporting -----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """``{key: {"trainable": n, "frozen": n}}`` for every module key (:func:`parameter_counts`)."""
        return parameter_counts(self)

    def inactive_parameters_per_token(self) -> int:
        """Parameters one token does not use (a fusion bridge's idle experts or bypassed originals; else 0)."""
        return self.bridge.inactive_parameters_per_token()

    # -- save / load ---------------------------------------------------------------------------
    def export_config(self) -> ModelConfig:
        """A config that rebuilds this exact architecture offline (weights come from the safetensors)."""
        return ModelConfig(vision=self.vision.export_config(), llm=self.llm.export_config(),
                           bridge=self.bridge.export_config(self.config.bridge),
                           image_token=self.config.image_token, image_token_id=self.image_token_id,
                           adapters=list(self.config.adapters),
                           highres=self.highres.export_config() if self.highres is not None else None,
                           output=self.output.export_configs())

    def save_pretrained(self, directory: str) -> None:
        """Write config, safetensors weights, tokenizer and processor settings; each file atomically."""
        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, WEIGHTS_FILE)) as temporary:
            save_model(self, temporary)
        self.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))
        if self.bridge.tokenizer is not None:
            self.bridge.tokenizer.save_pretrained(os.path.join(directory, BRIDGE_TOKENIZER_DIR))
        atomic_write_json(os.path.join(directory, PROCESSOR_FILE), self.processor_settings)
        atomic_write_json(os.path.join(directory, CONFIG_FILE),
                          {"format": "mmbridge", "version": 1, "model": self.export_config().to_dict(),
                           "parameters_at_save": self.parameter_counts()})

    @classmethod
    def from_pretrained(cls, directory: str) -> "MultimodalModel":
        """Reload a directory written by :meth:`save_pretrained`; logits are identical to the saved model's."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} is not an mmbridge model directory: {CONFIG_FILE} is missing")
        with open(path) as handle:
            saved = json.load(handle)
        if saved.get("format") != "mmbridge":
            raise ValueError(f"{path}: not an mmbridge config (format={saved.get('format')!r})")
        tokenizer = load_tokenizer(os.path.join(directory, TOKENIZER_DIR))
        processor_settings = {}
        if os.path.isfile(os.path.join(directory, PROCESSOR_FILE)):
            with open(os.path.join(directory, PROCESSOR_FILE)) as handle:
                processor_settings = json.load(handle)
        model = cls.from_config(ModelConfig(**saved["model"]), tokenizer=tokenizer,
                                processor_settings=processor_settings)
        missing, unexpected = load_model(model, os.path.join(directory, WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}/{WEIGHTS_FILE} does not match the config: "
                             f"missing {sorted(missing)[:5]}…, unexpected {sorted(unexpected)[:5]}…")
        if os.path.isdir(os.path.join(directory, BRIDGE_TOKENIZER_DIR)):
            from transformers import AutoTokenizer

            model.bridge.tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, BRIDGE_TOKENIZER_DIR))
        model.eval()
        model.parameters_at_save = saved.get("parameters_at_save")
        return model
