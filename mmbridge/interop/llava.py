"""Import from and export to transformers' ``LlavaForConditionalGeneration``.

:func:`from_hf_llava` turns an HF LLaVA (an instance, or a ``save_pretrained`` directory)
into a :class:`~mmbridge.model.multimodal.MultimodalModel` with the same weights and the
same logits: vision = :class:`~mmbridge.model.vision.hf.HFVisionEncoder` around the vision
tower, bridge = a depth-2 ``mlp`` (the layout of ``LlavaMultiModalProjector``), llm = the
text model as an HF ``*ForCausalLM``. :func:`to_hf_llava` goes the other way, folding LoRA
adapters into the base weights so the export is a plain LLaVA.

Feature selection (transformers' ``"default"`` drops the first token of every tower, even
SigLIP's, which has no CLS token):

* import: HF ``"default"`` → ``select="default"`` on CLS towers (CLIP, ViT), ``"drop_first"``
  on SigLIP; HF ``"full"`` → ``"full"``;
* export: ``"drop_first"``, and ``"default"`` on a CLS tower → HF ``"default"``; ``"full"``,
  and ``"default"`` on SigLIP (all patches kept) → HF ``"full"``.

Weights move through one name map (``vision.model.`` ↔ ``model.vision_tower.``,
``bridge.`` ↔ ``model.multi_modal_projector.``, ``llm.model.<base>.`` ↔
``model.language_model.``, ``llm.model.lm_head.`` ↔ ``lm_head.``) and are loaded
strictly: a tensor without a counterpart on either side is a ``ValueError`` naming it.

Memory: neither direction initialises a second model at random. The receiving model is
built with its parameters on the meta device and then takes the source's tensors
(:func:`_load_exactly`): clones when the source is a live model the caller keeps (one copy
of the weights, not two plus a random init), the tensors themselves when the source was
loaded from a directory just for the import (no copy at all). Tied weights are re-tied.

The import/export steps (opening a model or directory, tokenizer, config, weight transfer,
export checks) are shared with :mod:`mmbridge.interop.llava_next`, which adds AnyRes on top.

Tokenizer: an mmbridge model always carries one. :func:`from_hf_llava` takes the
``tokenizer`` argument, else the tokenizer saved in the directory; with neither it
raises a ``ValueError``. The image token id is pinned from the HF config, never added
to the tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel

from mmbridge.model.bridges.mlp import MLPBridge
from mmbridge.model.llm.base import LanguageModel
from mmbridge.model.llm.hf import load_tokenizer
from mmbridge.model.lora import merged_state_dict
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.model.vision.hf import HFVisionEncoder, tower_has_cls

__all__ = ["from_hf_llava", "to_hf_llava"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# -- import ------------------------------------------------------------------------------------
def from_hf_llava(model_or_dir: LlavaForConditionalGeneration | str | os.PathLike,
                  tokenizer: Any = None) -> MultimodalModel:
    """Build a :class:`MultimodalModel` with the weights (and logits) of an HF LLaVA.

    ``model_or_dir``: a ``LlavaForConditionalGeneration`` or a directory written by its
    ``save_pretrained``; from a directory the tokenizer and the image-processor settings
    (``preprocessor_config.json``, or the ``image_processor`` entry of ``processor_config.json``)
    are read from it too. ``tokenizer`` overrides the directory's; one of the two is required.
    Returns the model in eval mode.
    """
    hf_model, directory = open_hf_model(model_or_dir, LlavaForConditionalGeneration, "from_hf_llava")
    tokenizer = import_tokenizer(tokenizer, directory, "from_hf_llava")
    config = import_config(hf_model, tokenizer, _directory_image_processor(directory))
    return import_weights(hf_model, config, tokenizer, share=directory is not None)


def open_hf_model(model_or_dir: Any, model_class: type[PreTrainedModel], caller: str) -> tuple[Any, str | None]:
    """The HF model (an instance of ``model_class``) and, when it was loaded from one, its directory."""
    if isinstance(model_or_dir, model_class):
        return model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = os.fspath(model_or_dir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{caller}: {directory} is not a directory")
        return model_class.from_pretrained(directory), directory
    raise TypeError(f"{caller} takes a {model_class.__name__} or a directory, got {type(model_or_dir).__name__}")


def import_tokenizer(tokenizer: Any, directory: str | None, caller: str) -> Any:
    """``tokenizer`` if given, else the one saved in ``directory``; ``ValueError`` when there is neither."""
    tokenizer = tokenizer if tokenizer is not None else _directory_tokenizer(directory)
    if tokenizer is None:
        where = f"directory {directory} holds none" if directory else "a model instance carries none"
        raise ValueError(f"{caller} needs a tokenizer: pass tokenizer=... ({where})")
    return tokenizer


def import_weights(hf_model: PreTrainedModel, config: ModelConfig, tokenizer: Any, share: bool,
                   extra_pairs: tuple[tuple[str, str], ...] = ()) -> MultimodalModel:
    """A :class:`MultimodalModel` of ``config`` (built on the meta device) holding ``hf_model``'s tensors, in eval
    mode; ``share``: the source was loaded just for this import and gives its tensors away (no copy)."""
    model = empty_model(lambda: MultimodalModel.from_config(config, tokenizer=tokenizer))
    pairs = prefix_pairs(model.llm, extra_pairs)
    _load_exactly(model, _rename(hf_model.state_dict(), pairs, source=1), "mmbridge model", share=share)
    model.llm.model.generation_config = copy.deepcopy(hf_model.generation_config)
    model.eval()
    return model


def _directory_tokenizer(directory: str | None) -> Any:
    """The tokenizer saved in ``directory``, or None when there is none."""
    if directory is None or not any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES):
        return None
    return load_tokenizer(directory)


def _directory_image_processor(directory: str | None) -> dict | None:
    """HF image-processor settings saved in ``directory``, or None."""
    if directory is None:
        return None
    path = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    path = os.path.join(directory, "processor_config.json")
    if os.path.isfile(path):
        with open(path) as handle:
            settings = json.load(handle).get("image_processor")
        return settings if isinstance(settings, dict) else None
    return None


def import_config(hf_model: PreTrainedModel, tokenizer: Any, image_processor: dict | None) -> ModelConfig:
    """The mmbridge config matching an HF LLaVA's (or LLaVA-NeXT's) architecture (random weights until loaded)."""
    config = hf_model.config
    vision_type = config.vision_config.model_type
    text_dtype = next(hf_model.model.language_model.parameters()).dtype
    if text_dtype not in _DTYPE_NAMES:
        raise ValueError(f"from_hf_llava: unsupported language-model dtype {text_dtype}; "
                         f"supported: {sorted(_DTYPE_NAMES.values())}")
    if config.image_token_id >= config.text_config.vocab_size:
        raise ValueError(f"image_token_id {config.image_token_id} is outside the text vocabulary "
                         f"({config.text_config.vocab_size} ids)")
    vision = {"type": "hf", "hf_config": config.vision_config.to_dict(),
              "feature_layer": copy.deepcopy(config.vision_feature_layer),
              "select": _import_select(config.vision_feature_select_strategy, vision_type),
              "image_processor": image_processor}
    llm = {"type": "hf", "hf_config": config.text_config.to_dict(), "dtype": _DTYPE_NAMES[text_dtype]}
    bridge = {"type": "mlp", "depth": 2, "activation": config.projector_hidden_act,
              "hidden_dim": config.text_config.hidden_size, "bias": bool(config.multimodal_projector_bias)}
    return ModelConfig(vision=vision, llm=llm, bridge=bridge, image_token=_image_token(tokenizer, config.image_token_id),
                       image_token_id=int(config.image_token_id))


def _import_select(strategy: str, vision_type: str) -> str:
    """mmbridge ``select`` reproducing transformers' strategy on this tower exactly."""
    if strategy == "full":
        return "full"
    if strategy != "default":
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}; transformers knows 'default', 'full'")
    has_cls = tower_has_cls(vision_type)
    return "default" if has_cls else "drop_first"


def _image_token(tokenizer: Any, image_token_id: int) -> str:
    """The tokenizer's string for the image id when it has one (``<image>`` otherwise)."""
    if image_token_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(image_token_id)
        if isinstance(token, str):
            return token
    return "<image>"


# -- export ------------------------------------------------------------------------------------
def to_hf_llava(model: MultimodalModel) -> LlavaForConditionalGeneration:
    """Export a LLaVA-shaped :class:`MultimodalModel` as a plain ``LlavaForConditionalGeneration``.

    Requires an :class:`HFVisionEncoder`, an ``mlp`` bridge of depth 2 whose hidden width is
    the LLM width, an HF causal LM and no high-resolution strategy (an anyres model exports with
    :func:`~mmbridge.interop.llava_next.to_hf_llava_next`); LoRA adapters are merged into the
    weights. The result has identical weights and logits and is in eval mode.
    """
    check_exportable(model, "to_hf_llava")
    if model.highres is not None:
        raise ValueError(f"to_hf_llava: this model has a high-resolution strategy ({model.config.highres.type}) that "
                         f"LlavaForConditionalGeneration cannot run; export an anyres model with to_hf_llava_next")
    config = LlavaConfig(**export_fields(model))
    return export_weights(model, lambda: LlavaForConditionalGeneration(config))


def export_weights(model: MultimodalModel, build: Callable[[], PreTrainedModel],
                   extra_pairs: tuple[tuple[str, str], ...] = ()) -> Any:
    """``build()`` on the meta device, given ``model``'s tensors (LoRA merged) and generation config; eval mode."""
    hf_model = empty_model(build)
    pairs = prefix_pairs(model.llm, extra_pairs)
    _load_exactly(hf_model, _rename(merged_state_dict(model), pairs, source=0), type(hf_model).__name__)
    hf_model.generation_config = copy.deepcopy(model.llm.model.generation_config)
    hf_model.eval()
    return hf_model


def check_exportable(model: MultimodalModel, caller: str) -> None:
    """Raise ``ValueError`` unless the model has exactly LLaVA's structure (tower, projector, causal LM)."""
    if not isinstance(model.vision, HFVisionEncoder):
        raise ValueError(f"{caller} needs an HF vision tower (HFVisionEncoder), got {type(model.vision).__name__}")
    if not isinstance(model.bridge, MLPBridge):
        raise ValueError(f"{caller} needs an 'mlp' bridge of depth 2 (LLaVA's projector), "
                         f"got {type(model.bridge).__name__}")
    if model.bridge.depth != 2:
        raise ValueError(f"{caller}: LLaVA's projector has exactly 2 linear layers, "
                         f"this mlp bridge has depth {model.bridge.depth}")
    hidden, width = model.llm.hidden_size, model.bridge.linear_1.out_features
    if width != hidden:
        raise ValueError(f"{caller}: LLaVA's projector hidden width is the LLM width {hidden}, "
                         f"this mlp bridge has hidden_dim {width}")
    if not isinstance(model.llm, LanguageModel) or not isinstance(model.llm.model, PreTrainedModel) \
            or model.llm.is_encoder_decoder:
        raise ValueError(f"{caller} needs an HF causal LM (LLaVA is decoder-only), got "
                         f"{type(model.llm).__name__} around {type(model.llm.model).__name__}")


def export_fields(model: MultimodalModel) -> dict[str, Any]:
    """The config fields ``LlavaConfig`` and ``LlavaNextConfig`` share, describing ``model`` (checked by
    :func:`check_exportable`)."""
    vision: HFVisionEncoder = model.vision
    text_config = copy.deepcopy(model.llm.model.config)
    return dict(
        vision_config=copy.deepcopy(vision.model.config), text_config=text_config,
        image_token_id=model.image_token_id, image_seq_length=model.tokens_per_image,
        projector_hidden_act=_bridge_activation(model.config.bridge),
        vision_feature_select_strategy=export_strategy(vision),
        vision_feature_layer=copy.deepcopy(vision.feature_layer),
        multimodal_projector_bias=model.bridge.linear_1.bias is not None,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))


def export_strategy(vision: HFVisionEncoder) -> str:
    """HF's ``"default"`` when the encoder drops the first token, else ``"full"`` (same token set)."""
    drops_first = vision.select == "drop_first" or (vision.select == "default" and vision.has_cls)
    return "default" if drops_first else "full"


def _bridge_activation(spec: Any) -> str:
    """The activation name recorded in the bridge spec (dict or config dataclass)."""
    activation = spec.get("activation") if isinstance(spec, dict) else getattr(spec, "activation", None)
    if not isinstance(activation, str):
        raise ValueError(f"to_hf_llava: the bridge spec {spec!r} records no activation name")
    return activation


# -- weights -----------------------------------------------------------------------------------
def prefix_pairs(llm: LanguageModel, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    """``(mmbridge prefix, HF LLaVA prefix)`` for each part; the text body's prefix comes from the LM class.
    ``extra`` pairs (LLaVA-NeXT's ``image_newline``) come first, so they win over the broader prefixes."""
    causal_lm = llm.model
    output_embeddings = causal_lm.get_output_embeddings()
    head = next((name for name, module in causal_lm.named_modules() if module is output_embeddings), None)
    if output_embeddings is None or head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no LM head module; LLaVA needs one (lm_head)")
    return [*extra, ("vision.model.", "model.vision_tower."),
            ("bridge.", "model.multi_modal_projector."),
            (f"llm.model.{causal_lm.base_model_prefix}.", "model.language_model."),
            (f"llm.model.{head}.", "lm_head.")]


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], source: int) -> dict[str, torch.Tensor]:
    """Rename ``state`` from side ``source`` (0 = mmbridge, 1 = HF) of ``pairs`` to the other side."""
    renamed, unmapped = {}, []
    for name, tensor in state.items():
        pair = next((pair for pair in pairs if name.startswith(pair[source])), None)
        if pair is None:
            unmapped.append(name)
            continue
        renamed[pair[1 - source] + name[len(pair[source]):]] = tensor
    if unmapped:
        raise ValueError(f"{len(unmapped)} tensor(s) have no LLaVA counterpart: {unmapped[:10]}")
    return renamed


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with every parameter on the meta device (no memory, no random init); buffers are real."""
    with init_empty_weights(include_buffers=False):
        return build()


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str, share: bool = False) -> None:
    """Give ``module`` the tensors of ``state`` (names and shapes must match one to one), dtypes included.

    The parameters become ``state``'s tensors themselves with ``share`` (the source is thrown
    away), else clones (tensors shared under two names, tied weights, are cloned once). Tied
    weights of HF models inside ``module`` are re-tied; a parameter or buffer left on the meta
    device is an error.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not line up with the {what}: no source for {missing[:10]} "
                         f"({len(missing)}), no destination for {unexpected[:10]} ({len(unexpected)})")
    wrong = [f"{name}: {tuple(state[name].shape)} vs {tuple(tensor.shape)}"
             for name, tensor in expected.items() if state[name].shape != tensor.shape]
    if wrong:
        raise ValueError(f"tensor shapes differ from the {what}: {wrong[:10]}")
    if not share:
        clones: dict[tuple, torch.Tensor] = {}
        state = {name: clones.setdefault((tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype),
                                         tensor.detach().clone()) for name, tensor in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            sub.tie_weights()
    on_meta = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise ValueError(f"the {what} has tensors no weight reached: {on_meta[:10]}")
