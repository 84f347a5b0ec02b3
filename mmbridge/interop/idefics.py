"""transformers' ``IdeficsForVisionText2Text`` (an open reproduction of Flamingo) ⇄ mmbridge's ``gated_xattn``.

:func:`from_hf_idefics` builds a :class:`~mmbridge.model.multimodal.MultimodalModel` with the same weights
and logits: vision = a CLIP tower (IDEFICS' vision transformer has CLIP's layout; its last hidden state,
class token included, is what the resampler reads), bridge = ``gated_xattn`` whose resampler is the
``perceiver`` in IDEFICS' layout (``project: false``, ``head_dim``, ReLU) and whose blocks sit before every
``cross_layer_interval``-th layer, llm = a Llama with IDEFICS' text layers. IDEFICS' decoupled embedding
and LM head (``additional_vocab_size`` extra rows for ``<image>`` and ``<fake_token_around_image>``)
become the Llama's rows past the base vocabulary; the ``<image>`` row is also the bridge's marker
embedding. The imported model reads IDEFICS' tensors — ``pixel_values [B, N, 3, H, W]``,
``image_attention_mask [B, L, N]``, ``input_ids``, ``attention_mask`` — in ``forward`` and ``generate`` once
:func:`idefics_inputs` has flattened the pixels to ``[B·N, 3, H, W]`` (``model(**idefics_inputs(hf_batch))``).
:func:`to_hf_idefics` goes back. ``tests/test_interop_idefics.py`` holds both to 1e-4 with opened gates on
left-padded batches whose samples hold different numbers of images, and greedy ``generate`` token for token.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from mmbridge.interop.llava import _directory_tokenizer, _load_exactly, empty_model
from mmbridge.model.fusion.gated_xattn import GatedXAttnBridge
from mmbridge.model.lora import merged_state_dict
from mmbridge.model.multimodal import ModelConfig, MultimodalModel

IMAGE_TOKEN = "<image>"
VISION_KEYS = ("hidden_size", "image_size", "patch_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "hidden_act", "layer_norm_eps", "num_channels")


def idefics_inputs(hf_inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MultimodalModel.forward``/``generate`` for the tensors transformers' IDEFICS takes:
    ``pixel_values`` ``[B, N, 3, H, W]`` (``N`` image slots per row) become ``[B·N, 3, H, W]``; the
    ``image_attention_mask`` ``[B, L, N]`` says which slot each position reads, as in IDEFICS."""
    inputs = dict(hf_inputs)
    pixel_values = hf_inputs.get("pixel_values")
    if pixel_values is not None and pixel_values.dim() == 5:
        inputs["pixel_values"] = pixel_values.flatten(0, 1)
    return inputs


# -- import ------------------------------------------------------------------------------------------
def from_hf_idefics(model_or_dir: IdeficsForVisionText2Text | str | os.PathLike, tokenizer: Any = None) -> MultimodalModel:
    """Build a :class:`MultimodalModel` with the weights (and logits) of an HF IDEFICS model (eval mode).

    ``model_or_dir``: the model or a directory written by its ``save_pretrained`` (the tokenizer is read from
    it too); ``tokenizer`` overrides it and must hold ``<image>`` among the additional tokens.
    """
    hf_model, directory = _open(model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else _directory_tokenizer(directory)
    if tokenizer is None:
        raise ValueError("from_hf_idefics needs a tokenizer: pass tokenizer=... (the model carries none)")
    config = hf_model.config
    if not config.use_resampler or config.qk_layer_norms or config.alpha_type != "float":
        raise ValueError("from_hf_idefics supports IDEFICS with the perceiver resampler, no qk layer norms and "
                         f"float gates (got use_resampler={config.use_resampler}, qk_layer_norms="
                         f"{config.qk_layer_norms}, alpha_type={config.alpha_type!r})")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocabulary = config.vocab_size + config.additional_vocab_size
    if image_id is None or not config.vocab_size <= image_id < vocabulary or len(tokenizer) != vocabulary:
        raise ValueError(f"the tokenizer must hold {vocabulary} tokens with {IMAGE_TOKEN} among the additional "
                         f"ones (ids {config.vocab_size}..{vocabulary - 1}); it holds {len(tokenizer)} and "
                         f"{IMAGE_TOKEN} = {image_id}")
    model = empty_model(lambda: MultimodalModel.from_config(import_config(config, image_id), tokenizer=tokenizer))
    state = _to_mmbridge(hf_model.state_dict(), config, model, image_id)
    _load_exactly(model, state, "mmbridge model", share=False)
    model.llm.model.generation_config = hf_model.generation_config
    return model.eval()


def _open(model_or_dir: Any) -> tuple[IdeficsForVisionText2Text, str | None]:
    if isinstance(model_or_dir, IdeficsForVisionText2Text):
        return model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)) and os.path.isdir(model_or_dir):
        return IdeficsForVisionText2Text.from_pretrained(os.fspath(model_or_dir)), os.fspath(model_or_dir)
    raise TypeError(f"from_hf_idefics takes an IdeficsForVisionText2Text or a directory, got {model_or_dir!r}")


def import_config(config: IdeficsConfig, image_id: int) -> ModelConfig:
    """The mmbridge architecture of an IDEFICS config (random weights until loaded)."""
    vision = config.vision_config
    clip = {"model_type": "clip_vision_model", "projection_dim": vision.embed_dim,
            **{key: getattr(vision, "embed_dim" if key == "hidden_size" else key) for key in VISION_KEYS}}
    perceiver = config.perceiver_config
    resampler = {"type": "perceiver", "num_latents": perceiver.resampler_n_latents,
                 "depth": perceiver.resampler_depth, "heads": perceiver.resampler_n_heads,
                 "head_dim": perceiver.resampler_head_dim, "activation": "relu", "project": False, "ff_mult": 4}
    bridge = {"type": "gated_xattn", "resampler": resampler, "every": config.cross_layer_interval,
              "heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
              "chunk_token": None}
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    llm = {"model_type": "llama", "vocab_size": config.vocab_size + config.additional_vocab_size,
           "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
           "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
           "num_key_value_heads": config.num_attention_heads, "rms_norm_eps": config.rms_norm_eps,
           "hidden_act": config.hidden_act, "max_position_embeddings": config.max_position_embeddings,
           "tie_word_embeddings": False, "rope_parameters": rope, "pad_token_id": config.pad_token_id,
           "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "idefics_vocab_size": config.vocab_size}  # where the additional (decoupled) rows start, for export
    return ModelConfig(vision={"type": "hf", "hf_config": clip, "feature_layer": -1, "select": "full"},
                       llm={"type": "hf", "hf_config": llm}, bridge=bridge, image_token=IMAGE_TOKEN,
                       image_token_id=image_id)


# -- names -------------------------------------------------------------------------------------------
def _vision_prefix(model: MultimodalModel) -> str:
    """Where the CLIP tower's ``embeddings.class_embedding`` sits in mmbridge's state dict, minus that suffix."""
    suffix = "embeddings.class_embedding"
    return next(name[:-len(suffix)] for name in model.state_dict() if name.endswith(suffix))


def _text_prefixes(model: MultimodalModel) -> tuple[str, str]:
    causal_lm = model.llm.model
    head = next(name for name, module in causal_lm.named_modules() if module is causal_lm.get_output_embeddings())
    return f"llm.model.{causal_lm.base_model_prefix}.", f"llm.model.{head}."


def _block_pairs(config: IdeficsConfig) -> list[tuple[str, str]]:
    """``(mmbridge name, IDEFICS name)`` inside each gated block."""
    pairs = [("alpha_attn", "alpha_cross_attn"), ("alpha_ff", "alpha_dense"), ("attn_norm.weight",
             "input_layernorm.weight"), ("ff_norm.weight", "post_attention_layernorm.weight")]
    pairs += [(f"{name}.weight", f"cross_attn.{name}.weight") for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    pairs += [(f"{name}.weight", f"mlp.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")]
    return pairs


def _perceiver_pairs(depth: int) -> list[tuple[str, str]]:
    """``(mmbridge name, IDEFICS name)`` inside the resampler, except the fused keys/values."""
    pairs = [("latents", "latents"), ("norm.weight", "layer_norm.weight"), ("norm.bias", "layer_norm.bias")]
    for index in range(depth):
        ours, theirs = f"layers.{index}.", f"blocks.{index}."
        for part in ("weight", "bias"):
            pairs += [(f"{ours}attention.norm_media.{part}", f"{theirs}0.context_layer_norm.{part}"),
                      (f"{ours}attention.norm_latents.{part}", f"{theirs}0.latents_layer_norm.{part}"),
                      (f"{ours}feed_forward.0.{part}", f"{theirs}1.ln.{part}")]
        pairs += [(f"{ours}attention.to_q.weight", f"{theirs}0.q_proj.weight"),
                  (f"{ours}attention.to_out.weight", f"{theirs}0.output_proj.weight"),
                  (f"{ours}feed_forward.1.weight", f"{theirs}1.fc.weight"),
                  (f"{ours}feed_forward.3.weight", f"{theirs}1.c_proj.weight")]
    return pairs


def _to_mmbridge(state: dict[str, torch.Tensor], config: IdeficsConfig, model: MultimodalModel,
                 image_id: int) -> dict[str, torch.Tensor]:
    """IDEFICS' state dict under mmbridge's names."""
    vision, (body, head) = _vision_prefix(model), _text_prefixes(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("model.vision_model."):
            out[vision + name[len("model.vision_model."):]] = tensor
        elif name.startswith("model.layers.") or name == "model.norm.weight":
            out[body + name[len("model."):]] = tensor
    embeddings = torch.cat([state["model.embed_tokens.weight"], state["model.embed_tokens.additional_embedding.weight"]])
    out[body + "embed_tokens.weight"] = embeddings
    out[head + "weight"] = torch.cat([state["lm_head.weight"], state["lm_head.additional_fc.weight"]])
    markers = torch.zeros(2, embeddings.shape[1], dtype=embeddings.dtype)
    markers[0] = embeddings[image_id]  # <image>; there is no chunk token
    out["bridge.marker_embeddings.weight"] = markers
    resampler = "model.perceiver_resampler."
    depth = config.perceiver_config.resampler_depth
    for ours, theirs in _perceiver_pairs(depth):
        out[f"bridge.projector.{ours}"] = state[resampler + theirs]
    for index in range(depth):
        theirs = f"{resampler}blocks.{index}.0."
        out[f"bridge.projector.layers.{index}.attention.to_kv.weight"] = torch.cat(
            [state[theirs + "k_proj.weight"], state[theirs + "v_proj.weight"]])
    time = model.bridge.projector.time_embeddings
    out["bridge.projector.time_embeddings"] = torch.zeros(time.shape, dtype=embeddings.dtype)  # IDEFICS has none
    for number in range(config.num_hidden_layers // config.cross_layer_interval):
        layer = number * config.cross_layer_interval
        for ours, theirs in _block_pairs(config):
            out[f"bridge.blocks.{layer}.{ours}"] = state[f"model.gated_cross_attn_layers.{number}.{theirs}"]
    return out


# -- export ------------------------------------------------------------------------------------------
def to_hf_idefics(model: MultimodalModel) -> IdeficsForVisionText2Text:
    """Export a model of IDEFICS' shape (as :func:`from_hf_idefics` builds) as ``IdeficsForVisionText2Text``
    (eval mode, identical weights and logits; LoRA merged); anything without a counterpart is a ``ValueError``."""
    bridge = model.bridge
    if not isinstance(bridge, GatedXAttnBridge):
        raise ValueError(f"to_hf_idefics needs a gated_xattn bridge, got {type(bridge).__name__}")
    resampler = bridge.projector
    if type(resampler).__name__ != "PerceiverResampler" or not isinstance(resampler.input_proj, torch.nn.Identity):
        raise ValueError("to_hf_idefics needs the perceiver resampler in IDEFICS' layout (project: false)")
    if bridge.cfg.chunk_token is not None or bool(resampler.time_embeddings.detach().abs().max() > 0):
        raise ValueError("to_hf_idefics: IDEFICS has no chunk token and no temporal embeddings; this model uses them")
    hf_config = export_config(model)
    hf_model = empty_model(lambda: IdeficsForVisionText2Text(hf_config))
    state = merged_state_dict(model)  # LoRA adapters folded into their weights
    vision, (body, head) = _vision_prefix(model), _text_prefixes(model)
    vocab = hf_config.vocab_size
    out = {"model.vision_model." + name[len(vision):]: tensor for name, tensor in state.items()
           if name.startswith(vision)}
    out.update({"model." + name[len(body):]: tensor for name, tensor in state.items()
                if name.startswith(body + "layers.") or name == body + "norm.weight"})
    embeddings = state[body + "embed_tokens.weight"].clone()
    embeddings[model.image_token_id] = state["bridge.marker_embeddings.weight"][0]  # what <image> positions read
    out["model.embed_tokens.weight"], out["model.embed_tokens.additional_embedding.weight"] = \
        embeddings[:vocab], embeddings[vocab:]
    logits = state[head + "weight"]
    out["lm_head.weight"], out["lm_head.additional_fc.weight"] = logits[:vocab], logits[vocab:]
    resampler_prefix = "model.perceiver_resampler."
    depth = hf_config.perceiver_config.resampler_depth
    for ours, theirs in _perceiver_pairs(depth):
        out[resampler_prefix + theirs] = state[f"bridge.projector.{ours}"]
    for index in range(depth):
        keys, values = state[f"bridge.projector.layers.{index}.attention.to_kv.weight"].chunk(2)
        out[f"{resampler_prefix}blocks.{index}.0.k_proj.weight"] = keys
        out[f"{resampler_prefix}blocks.{index}.0.v_proj.weight"] = values
    for number in range(hf_config.num_hidden_layers // hf_config.cross_layer_interval):
        layer = number * hf_config.cross_layer_interval
        for ours, theirs in _block_pairs(hf_config):
            out[f"model.gated_cross_attn_layers.{number}.{theirs}"] = state[f"bridge.blocks.{layer}.{ours}"]
    _load_exactly(hf_model, out, "IdeficsForVisionText2Text", share=False)
    hf_model.generation_config = model.llm.model.generation_config
    return hf_model.eval()


def export_config(model: MultimodalModel) -> IdeficsConfig:
    """The IDEFICS config of an IDEFICS-shaped mmbridge model."""
    text = model.llm.config
    vision = model.vision.model.config
    resampler = model.bridge.projector
    layers = sorted(int(key) for key in model.bridge.blocks)
    interval = layers[1] - layers[0] if len(layers) > 1 else text.num_hidden_layers
    if layers != list(range(0, text.num_hidden_layers, interval)):
        raise ValueError(f"to_hf_idefics: gated blocks before layers {layers} are not every n-th from the first")
    attention = resampler.layers[0].attention
    base = getattr(text, "idefics_vocab_size", None) or model.image_token_id  # else: additional rows from <image>
    return IdeficsConfig(
        vocab_size=base, additional_vocab_size=text.vocab_size - base, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, rms_norm_eps=text.rms_norm_eps, hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings, cross_layer_interval=interval, use_resampler=True,
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        rope_parameters=dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
        vision_config={"embed_dim": vision.hidden_size, "image_size": vision.image_size,
                       "patch_size": vision.patch_size, "intermediate_size": vision.intermediate_size,
                       "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
                       "hidden_act": vision.hidden_act, "layer_norm_eps": vision.layer_norm_eps,
                       "num_channels": vision.num_channels},
        perceiver_config={"resampler_n_latents": resampler.num_latents, "resampler_depth": len(resampler.layers),
                          "resampler_n_heads": attention.heads,
                          "resampler_head_dim": attention.to_q.out_features // attention.heads})

