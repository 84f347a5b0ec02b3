"""Import from and export to transformers' BLIP-2 and InstructBLIP (``*ForConditionalGeneration``).

:func:`from_hf_blip2` / :func:`from_hf_instructblip` turn an HF model (an instance, or a
``save_pretrained`` directory) into a :class:`~mmbridge.model.multimodal.MultimodalModel`
with the same weights and logits:

* vision = a ``module`` encoder around the HF vision tower (:class:`BlipVisionTower`),
  whose features are the tower's ``last_hidden_state`` (CLS included, after
  ``post_layernorm``), exactly what HF feeds its Q-Former;
* bridge = ``qformer`` (BLIP-2) or ``instruct_qformer`` (InstructBLIP) with
  ``vision_norm=False`` (HF's tower already ends in a LayerNorm), the query tokens, the
  Q-Former and ``language_projection``;
* llm = the language model: a decoder-only HF ``*ForCausalLM`` (OPT, Llama, …), or the
  encoder–decoder Flan-T5 of BLIP-2 FlanT5 / InstructBLIP FlanT5 (``T5ForConditionalGeneration``
  behind :class:`~mmbridge.model.llm.seq2seq.Seq2SeqLanguageModel`: queries + prompt into the
  encoder, the answer from the decoder).

The imported model's forward takes the tensors the HF class takes: ``pixel_values``,
``input_ids`` with the ``image_token_id`` placeholder repeated ``num_query_tokens`` times
(as transformers 5's processors expand it), ``attention_mask``, ``labels``, for T5
``decoder_input_ids``/``decoder_attention_mask``; InstructBLIP's ``qformer_input_ids``/
``qformer_attention_mask`` become the model's ``bridge_inputs`` through :func:`blip2_inputs`
(``model(**blip2_inputs(hf_batch))``). :func:`to_hf_blip2` / :func:`to_hf_instructblip`
go the other way (LoRA merged).

Weights move through one explicit name map built from the mmbridge model's tensor names
and are loaded strictly: a tensor without a counterpart on either side is a ``ValueError``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          Blip2VisionModel, InstructBlipConfig, InstructBlipForConditionalGeneration,
                          InstructBlipQFormerConfig, InstructBlipVisionConfig, InstructBlipVisionModel,
                          PreTrainedModel)

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.interop.llava import _DTYPE_NAMES, _directory_image_processor, _directory_tokenizer, _image_token, \
    _load_exactly, empty_model
from mmbridge.model.bridges.instruct_qformer import InstructQFormerBridge
from mmbridge.model.bridges.qformer import QFormerBridge
from mmbridge.model.llm.base import LanguageModel
from mmbridge.model.lora import merged_state_dict
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.model.vision.module import ModuleVisionEncoder
from mmbridge.model.vision.transform import ImageTransform

__all__ = ["blip2_inputs", "BlipVisionTower", "from_hf_blip2", "to_hf_blip2", "from_hf_instructblip",
           "to_hf_instructblip"]

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_TOWERS = {"blip_2_vision_model": (Blip2VisionConfig, Blip2VisionModel),
           "instructblip_vision_model": (InstructBlipVisionConfig, InstructBlipVisionModel)}
# mmbridge Q-Former module (inside layer i) → HF module (inside encoder.layer.i)
_LAYER_MODULES = {
    **{f"{ours}.{part}": f"{theirs}.attention.{part}" for ours, theirs in
       (("self_attention", "attention"), ("cross_attention", "crossattention")) for part in ("query", "key", "value")},
    **{f"{ours}.dense": f"{theirs}.output.dense" for ours, theirs in
       (("self_attention", "attention"), ("cross_attention", "crossattention"))},
    **{f"{ours}.norm": f"{theirs}.output.LayerNorm" for ours, theirs in
       (("self_attention", "attention"), ("cross_attention", "crossattention"))},
    "query_ffn.up": "intermediate_query.dense", "query_ffn.down": "output_query.dense",
    "query_ffn.norm": "output_query.LayerNorm", "text_ffn.up": "intermediate.dense",
    "text_ffn.down": "output.dense", "text_ffn.norm": "output.LayerNorm",
}


class _Family:
    """What differs between BLIP-2 and InstructBLIP: classes, the bridge type, the Q-Former's LayerNorm name."""

    def __init__(self, name: str, model_cls: type, config_cls: type, qformer_config_cls: type, bridge_type: str,
                 bridge_cls: type, tower_type: str, layernorm: str) -> None:
        self.name, self.model_cls, self.config_cls = name, model_cls, config_cls
        self.qformer_config_cls, self.bridge_type, self.bridge_cls = qformer_config_cls, bridge_type, bridge_cls
        self.tower_type, self.layernorm = tower_type, layernorm


BLIP2 = _Family("Blip2ForConditionalGeneration", Blip2ForConditionalGeneration, Blip2Config, Blip2QFormerConfig,
                "qformer", QFormerBridge, "blip_2_vision_model", "layernorm")
INSTRUCTBLIP = _Family("InstructBlipForConditionalGeneration", InstructBlipForConditionalGeneration,
                       InstructBlipConfig, InstructBlipQFormerConfig, "instruct_qformer", InstructQFormerBridge,
                       "instructblip_vision_model", "embeddings.layernorm")


class BlipVisionTower(nn.Module):
    """An HF BLIP-2/InstructBLIP vision model returning ``last_hidden_state`` ``[B, 1 + patches, D]``."""

    def __init__(self, hf_config: dict, model_type: str = "blip_2_vision_model") -> None:
        super().__init__()
        if model_type not in _TOWERS:
            raise ValueError(f"BlipVisionTower model_type must be one of {sorted(_TOWERS)}, got {model_type!r}")
        config_cls, model_cls = _TOWERS[model_type]
        self.model = model_cls(config_cls.from_dict(dict(hf_config)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        return self.model(pixel_values=pixel_values).last_hidden_state


# -- import ------------------------------------------------------------------------------------
def blip2_inputs(hf_inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MultimodalModel.forward``/``generate`` for the tensors transformers' BLIP-2 and
    InstructBLIP take: everything as is, but ``qformer_input_ids``/``qformer_attention_mask`` (InstructBLIP's
    instruction per image) become ``bridge_inputs``."""
    inputs = {key: value for key, value in hf_inputs.items() if not key.startswith("qformer_")}
    if hf_inputs.get("qformer_input_ids") is not None:
        text_ids = hf_inputs["qformer_input_ids"]
        text_mask = hf_inputs.get("qformer_attention_mask")
        inputs["bridge_inputs"] = BridgeInputs(text_ids, torch.ones_like(text_ids) if text_mask is None else text_mask)
    return inputs


def from_hf_blip2(model_or_dir: Blip2ForConditionalGeneration | str | os.PathLike,
                  tokenizer: Any = None) -> MultimodalModel:
    """Build a :class:`MultimodalModel` with the weights (and logits) of an HF BLIP-2 (decoder-only LM).

    ``model_or_dir``: a ``Blip2ForConditionalGeneration`` or its ``save_pretrained`` directory
    (tokenizer and image-processor settings are read from it too). ``tokenizer`` (the LLM's)
    overrides the directory's; one of the two is required. Returns the model in eval mode.
    """
    return _import(BLIP2, model_or_dir, tokenizer, None)


def from_hf_instructblip(model_or_dir: InstructBlipForConditionalGeneration | str | os.PathLike,
                         tokenizer: Any = None, qformer_tokenizer: Any = None) -> MultimodalModel:
    """Like :func:`from_hf_blip2` for InstructBLIP; ``qformer_tokenizer`` (or the directory's
    ``qformer_tokenizer/``) becomes the bridge's tokenizer, so the processor writes the instruction ids."""
    return _import(INSTRUCTBLIP, model_or_dir, tokenizer, qformer_tokenizer)


def _import(family: _Family, model_or_dir: Any, tokenizer: Any, qformer_tokenizer: Any) -> MultimodalModel:
    hf_model, directory = _open(family, model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else _directory_tokenizer(directory)
    if tokenizer is None:
        where = f"directory {directory} holds none" if directory else "a model instance carries none"
        raise ValueError(f"importing a {family.name} needs the LLM tokenizer: pass tokenizer=... ({where})")
    config = _import_config(family, hf_model, tokenizer, _directory_image_processor(directory))
    model = empty_model(lambda: MultimodalModel.from_config(config, tokenizer=tokenizer))
    names = _name_map(model, family)
    hf_state = hf_model.state_dict()
    unused = sorted(set(hf_state) - set(names.values()))
    if unused:
        raise ValueError(f"{len(unused)} {family.name} tensor(s) have no mmbridge counterpart: {unused[:10]}")
    missing = sorted(theirs for theirs in names.values() if theirs not in hf_state)
    if missing:
        raise ValueError(f"the {family.name} lacks {len(missing)} tensor(s) the mmbridge model needs: {missing[:10]}")
    _load_exactly(model, {ours: hf_state[theirs] for ours, theirs in names.items()}, "mmbridge model",
                  share=directory is not None)
    model.llm.model.generation_config = copy.deepcopy(hf_model.generation_config)
    if family is INSTRUCTBLIP:
        model.bridge.tokenizer = qformer_tokenizer if qformer_tokenizer is not None else \
            _directory_tokenizer(os.path.join(directory, "qformer_tokenizer") if directory else None)
    return model.eval()


def _open(family: _Family, model_or_dir: Any) -> tuple[PreTrainedModel, str | None]:
    """The HF model and, when it was loaded from one, its directory."""
    if isinstance(model_or_dir, family.model_cls):
        return model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = os.fspath(model_or_dir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"importing a {family.name}: {directory} is not a directory")
        return family.model_cls.from_pretrained(directory), directory
    raise TypeError(f"expected a {family.name} or a directory, got {type(model_or_dir).__name__}")


def _plain_config(config: Any) -> dict:
    """A config as a JSON-safe dict."""
    return json.loads(config.to_json_string(use_diff=False))


def _import_config(family: _Family, hf_model: PreTrainedModel, tokenizer: Any,
                   image_processor: dict | None) -> ModelConfig:
    """The mmbridge config matching the HF model's architecture (random weights until loaded)."""
    config = hf_model.config
    if config.image_token_id is None or config.image_token_id >= config.text_config.vocab_size:
        raise ValueError(f"{family.name}: image_token_id {config.image_token_id} must be set and inside the text "
                         f"vocabulary ({config.text_config.vocab_size} ids); older checkpoints without it need one")
    text_dtype = next(hf_model.language_model.parameters()).dtype
    if text_dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported language-model dtype {text_dtype}; supported: {sorted(_DTYPE_NAMES.values())}")
    vision = _vision_spec(family, config.vision_config, image_processor)
    llm = {"type": "hf", "hf_config": _plain_config(config.text_config), "dtype": _DTYPE_NAMES[text_dtype]}
    return ModelConfig(vision=vision, llm=llm, bridge=_bridge_spec(family, config),
                       image_token=_image_token(tokenizer, config.image_token_id),
                       image_token_id=int(config.image_token_id))


def _vision_spec(family: _Family, vision_config: Any, image_processor: dict | None) -> dict:
    """A ``module`` encoder spec around the HF tower, with BLIP's image processing (or the saved one)."""
    side = vision_config.image_size
    defaults = {"size": {"height": side, "width": side}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3}
    transform = ImageTransform.from_hf({**defaults, **(image_processor or {})})
    patches = (side // vision_config.patch_size) ** 2
    return {"type": "module", "target": f"{__name__}:BlipVisionTower",
            "kwargs": {"hf_config": _plain_config(vision_config), "model_type": family.tower_type},
            "feature_dim": vision_config.hidden_size, "layout": "tokens", "image_transform": transform.to_dict(),
            "num_tokens": patches + 1}


def _bridge_spec(family: _Family, config: Any) -> dict:
    """The ``qformer``/``instruct_qformer`` spec with HF's Q-Former architecture and no feature LayerNorm."""
    qformer = config.qformer_config
    return {"type": family.bridge_type, "num_queries": config.num_query_tokens,
            "cross_attention_frequency": qformer.cross_attention_frequency, "vision_norm": False,
            "hidden_size": qformer.hidden_size, "num_layers": qformer.num_hidden_layers,
            "num_heads": qformer.num_attention_heads, "intermediate_size": qformer.intermediate_size,
            "vocab_size": qformer.vocab_size, "max_position_embeddings": qformer.max_position_embeddings,
            "hidden_act": qformer.hidden_act, "layer_norm_eps": qformer.layer_norm_eps,
            "dropout": qformer.hidden_dropout_prob, "attention_dropout": qformer.attention_probs_dropout_prob,
            "initializer_range": qformer.initializer_range}


# -- export ------------------------------------------------------------------------------------
def to_hf_blip2(model: MultimodalModel) -> Blip2ForConditionalGeneration:
    """Export a BLIP-2-shaped model (BLIP-2 vision tower, ``qformer`` bridge without ``vision_norm``,
    HF causal LM) as ``Blip2ForConditionalGeneration``; identical weights and logits, eval mode."""
    return _export(BLIP2, model)


def to_hf_instructblip(model: MultimodalModel) -> InstructBlipForConditionalGeneration:
    """Export an InstructBLIP-shaped model (``instruct_qformer`` bridge) as ``InstructBlipForConditionalGeneration``."""
    return _export(INSTRUCTBLIP, model)


def _export(family: _Family, model: MultimodalModel) -> PreTrainedModel:
    _check_exportable(family, model)
    hf_model = empty_model(lambda: family.model_cls(_export_config(family, model)))
    state = merged_state_dict(model)
    _load_exactly(hf_model, {theirs: state[ours] for ours, theirs in _name_map(model, family).items()}, family.name)
    hf_model.generation_config = copy.deepcopy(model.llm.model.generation_config)
    return hf_model.eval()


def _check_exportable(family: _Family, model: MultimodalModel) -> None:
    """Raise ``ValueError`` unless ``model`` has exactly the HF class's structure."""
    if type(model.bridge) is not family.bridge_cls:
        raise ValueError(f"exporting a {family.name} needs a '{family.bridge_type}' bridge, "
                         f"got {type(model.bridge).__name__}")
    tower = getattr(model.vision, "module", None)
    if not isinstance(model.vision, ModuleVisionEncoder) or not isinstance(tower, BlipVisionTower) \
            or tower.model.config.model_type != family.tower_type:
        raise ValueError(f"exporting a {family.name} needs its vision tower (a 'module' encoder around "
                         f"BlipVisionTower of type {family.tower_type}), got {type(model.vision).__name__}")
    if model.bridge.qformer.vision_norm is not None:
        raise ValueError(f"exporting a {family.name}: the bridge has vision_norm (a LayerNorm on the image "
                         f"features) that {family.name} has no place for; build it with vision_norm=False")
    if not isinstance(model.llm, LanguageModel) or not isinstance(model.llm.model, PreTrainedModel):
        raise ValueError(f"exporting a {family.name} needs an HF causal LM, got {type(model.llm).__name__}")


def _export_config(family: _Family, model: MultimodalModel) -> Any:
    """The HF config describing ``model`` (checked by :func:`_check_exportable`)."""
    spec = model.bridge.spec
    qformer_config = family.qformer_config_cls(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size, hidden_act=spec.hidden_act,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.attention_dropout,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.initializer_range,
        layer_norm_eps=spec.layer_norm_eps, cross_attention_frequency=spec.cross_attention_frequency,
        encoder_hidden_size=model.vision.feature_dim)
    text_config = copy.deepcopy(model.llm.model.config)
    return family.config_cls(vision_config=copy.deepcopy(model.vision.module.model.config),
                             qformer_config=qformer_config, text_config=text_config,
                             num_query_tokens=spec.num_queries, image_token_index=model.image_token_id)


# -- weights -----------------------------------------------------------------------------------
def _name_map(model: MultimodalModel, family: _Family) -> dict[str, str]:
    """Every mmbridge tensor name (LoRA merged away) → its name in the HF class."""
    names = {}
    for name in merged_state_dict(model):
        theirs = _hf_name(name, family)
        if theirs is None:
            raise ValueError(f"mmbridge tensor {name!r} has no {family.name} counterpart")
        names[name] = theirs
    return names


def _hf_name(name: str, family: _Family) -> str | None:
    """The HF name of one mmbridge tensor, or None when it has none."""
    for ours, theirs in (("vision.module.model.", "vision_model."), ("llm.model.", "language_model."),
                         ("bridge.projection.", "language_projection.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    if name == "bridge.qformer.query_tokens":
        return "query_tokens"
    if not name.startswith("bridge.qformer."):
        return None
    rest = name[len("bridge.qformer."):]
    if rest.startswith("embeddings.layernorm."):
        return f"qformer.{family.layernorm}.{rest.rsplit('.', 1)[1]}"
    if rest.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
        return f"qformer.{rest}"
    if not rest.startswith("layers."):
        return None
    index, inner = rest[len("layers."):].split(".", 1)
    module, leaf = inner.rsplit(".", 1)
    return f"qformer.encoder.layer.{index}.{_LAYER_MODULES[module]}.{leaf}" if module in _LAYER_MODULES else None

