"""Import from and export to transformers' ``FuyuForCausalLM`` (Fuyu-8B; the OtterHD architecture).

Fuyu has no vision encoder: image patches (30 × 30 px, flattened with the channels innermost) go
through one linear layer, ``vision_embed_tokens``, into a Persimmon decoder; the image occupies
``rows × (cols × |SPEAKER| + |NEWLINE|)`` positions of the input. In mmbridge that is

* vision = the parameter-free ``patch`` encoder (Fuyu's patch order and normalisation);
* bridge = ``mlp`` of depth 1 with bias (``bridge.linear_1`` ↔ ``model.vision_embed_tokens``);
* llm = the text model as an HF ``*ForCausalLM`` (``llm.model.model.`` ↔ ``model.language_model.``,
  ``llm.model.lm_head.`` ↔ ``lm_head.``; ``AutoModelForCausalLM`` builds Persimmon from its config);
* highres = ``native``: each image at its own size (capped by the image processor's ``size``, 1080 × 1920),
  padded bottom/right with Fuyu's pixel value 1 to multiples of the patch size, a ``|NEWLINE|`` row end
  after each row of patches.

Fuyu's placeholder ``image_token_id`` (``|SPEAKER|``) is pinned as mmbridge's image token, never added to
the tokenizer; ``|NEWLINE|`` is an ordinary token id of the layout, so the tokenizer must hold it as one token.

Inputs. transformers 5.24's ``FuyuForCausalLM.forward`` takes ``input_ids`` (placeholders already
expanded, ``|NEWLINE|`` ids in place), ``attention_mask``, ``pixel_values`` = the patches of all images
(``[N_total, 3·p·p]`` as ``FuyuProcessor(return_legacy_image_output=False)`` concatenates them, or
``[B, N, 3·p·p]``), written in order into the ``image_token_id`` positions by ``masked_scatter``; the
``image_patches`` keyword is a deprecated alias of ``pixel_values`` and ``image_patches_indices`` of older
releases is gone. :func:`fuyu_inputs` turns those patch sequences into the visual tokens in slot order
(``image_tokens``, through the bridge), which the model's ``forward`` and ``generate`` take
(``model(**fuyu_inputs(model, hf_batch))``); the model's own inputs are ``pixel_values`` crops
``[n, 3, H, W]`` + ``image_sizes``. Fuyu's position ids default to ``arange``
whatever the mask says (so do mmbridge's when none are given); ``generate`` on both sides derives them
from the attention mask, so left-padded prompts decode the same way.

Weights are moved with :func:`mmbridge.interop.llava._load_exactly` (strict, no random init, tied
embeddings re-tied); LoRA adapters are merged on export.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers import FuyuConfig, FuyuForCausalLM, PreTrainedModel

from mmbridge.interop.llava import (_DTYPE_NAMES, _directory_image_processor, _directory_tokenizer, _image_token,
                                    _load_exactly, _rename, empty_model)
from mmbridge.model.bridges.mlp import MLPBridge
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.highres.native import FUYU_MAX_SIZE, FUYU_PAD_COLOUR, Native
from mmbridge.model.llm.base import LanguageModel
from mmbridge.model.lora import merged_state_dict
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.model.vision.patch import PatchEncoder
from mmbridge.model.vision.transform import ImageTransform

__all__ = ["from_hf_fuyu", "to_hf_fuyu", "fuyu_inputs"]

FUYU_ROW_END = "|NEWLINE|"  # FuyuProcessor's image_newline_token


def fuyu_inputs(model: MultimodalModel, hf_inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MultimodalModel.forward``/``generate`` for the tensors transformers' Fuyu takes:
    ``pixel_values`` that are patch sequences (``[N_total, 3·p·p]`` or ``[B, N, 3·p·p]``, every image's patches in
    slot order) become ``image_tokens`` ``[N_total, D]`` through the patch encoder and the bridge; the rest is kept."""
    inputs = dict(hf_inputs)
    patches = hf_inputs.get("pixel_values")
    if patches is not None and patches.dim() in (2, 3) and patches.shape[-1] == model.vision.feature_dim:
        flat = patches.reshape(1, -1, patches.shape[-1])  # [1, N_total, 3·p·p]
        features = model.vision(flat)  # [1, N_total, 3·p·p]: patchified input passes the patch encoder as is
        inputs["image_tokens"] = model.bridge(features, FeatureGrid.sequence(flat.shape[1]))[0]  # [N_total, D]
        del inputs["pixel_values"]
    return inputs


# -- import ------------------------------------------------------------------------------------
def from_hf_fuyu(model_or_dir: FuyuForCausalLM | str | os.PathLike, tokenizer: Any = None,
                 row_end: str = FUYU_ROW_END) -> MultimodalModel:
    """Build a :class:`MultimodalModel` with the weights (and logits) of an HF Fuyu.

    ``model_or_dir``: a ``FuyuForCausalLM`` or a directory written by its ``save_pretrained``; from a directory the
    tokenizer and the image-processor settings (``preprocessor_config.json`` or ``processor_config.json``: size,
    patch size, padding value, mean/std, rescale, resample) are read too. ``tokenizer`` overrides the directory's;
    one of the two is required, and it must encode ``row_end`` (Fuyu's ``|NEWLINE|``) as one token.
    Returns the model in eval mode.
    """
    hf_model, directory = _open_hf_fuyu(model_or_dir)
    tokenizer = tokenizer if tokenizer is not None else _directory_tokenizer(directory)
    if tokenizer is None:
        where = f"directory {directory} holds none" if directory else "a model instance carries none"
        raise ValueError(f"from_hf_fuyu needs a tokenizer: pass tokenizer=... ({where})")
    config = _import_config(hf_model, tokenizer, _directory_image_processor(directory), row_end)
    model = empty_model(lambda: MultimodalModel.from_config(config, tokenizer=tokenizer))
    _load_exactly(model, _rename(hf_model.state_dict(), _prefix_pairs(model.llm), source=1), "mmbridge model",
                  share=directory is not None)  # a model loaded just for this import gives its tensors away
    model.llm.model.generation_config = copy.deepcopy(hf_model.generation_config)
    model.eval()
    return model


def _open_hf_fuyu(model_or_dir: Any) -> tuple[FuyuForCausalLM, str | None]:
    """The HF model and, when it was loaded from one, its directory."""
    if isinstance(model_or_dir, FuyuForCausalLM):
        return model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = os.fspath(model_or_dir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"from_hf_fuyu: {directory} is not a directory")
        return FuyuForCausalLM.from_pretrained(directory), directory
    raise TypeError(f"from_hf_fuyu takes a FuyuForCausalLM or a directory, got {type(model_or_dir).__name__}")


def _import_config(hf_model: FuyuForCausalLM, tokenizer: Any, image_processor: dict | None,
                   row_end: str) -> ModelConfig:
    """The mmbridge config matching an HF Fuyu's architecture and image processor (random weights until loaded)."""
    config = hf_model.config
    if config.num_channels != 3:
        raise ValueError(f"from_hf_fuyu: the patch encoder takes RGB images, this Fuyu has num_channels "
                         f"{config.num_channels}")
    text_dtype = next(hf_model.model.language_model.parameters()).dtype
    if text_dtype not in _DTYPE_NAMES:
        raise ValueError(f"from_hf_fuyu: unsupported language-model dtype {text_dtype}; "
                         f"supported: {sorted(_DTYPE_NAMES.values())}")
    if not 0 <= config.image_token_id < config.text_config.vocab_size:
        raise ValueError(f"from_hf_fuyu: image_token_id {config.image_token_id} is outside the text vocabulary "
                         f"({config.text_config.vocab_size} ids)")
    row_ids = tokenizer(row_end, add_special_tokens=False)["input_ids"]
    if len(row_ids) != 1:
        raise ValueError(f"from_hf_fuyu: Fuyu ends each row of patches with {row_end!r}, which must be one token of "
                         f"the tokenizer, but it encodes to {row_ids}; pass the tokenizer saved with the model "
                         f"(FuyuProcessor's) or row_end=...")
    patch = int(config.patch_size)
    settings = image_processor or {}
    vision = {"type": "patch", "patch_size": patch, "image_size": max(1, int(config.image_size) // patch) * patch,
              **_transform_fields(settings)}
    highres = {"type": "native", "max_size": _max_size(settings), "row_end": row_end,
               "pad_colour": _pad_colour(settings)}
    _check_patch_size(settings, patch)
    return ModelConfig(vision=vision, bridge={"type": "mlp", "depth": 1, "bias": True},
                       llm={"type": "hf", "hf_config": config.text_config.to_dict(),
                            "dtype": _DTYPE_NAMES[text_dtype]},
                       image_token=_image_token(tokenizer, config.image_token_id),
                       image_token_id=int(config.image_token_id), highres=highres)


def _transform_fields(settings: dict) -> dict:
    """The patch encoder's normalisation from FuyuImageProcessor settings (Fuyu's defaults when absent)."""
    if not settings:
        return {}
    defaults = {"image_mean": 0.5, "image_std": 0.5, "resample": 2}  # FuyuImageProcessor: bilinear
    transform = ImageTransform.from_hf({**defaults, **settings, "size": {"height": 1, "width": 1}})
    return {"resample": transform.resample, "rescale": transform.rescale, "mean": list(transform.mean),
            "std": list(transform.std)}


def _max_size(settings: dict) -> list[int] | None:
    """[height, width] images are scaled down to fit (None when the processor does not resize)."""
    if settings.get("do_resize") is False:
        return None
    size = settings.get("size") or {"height": FUYU_MAX_SIZE[0], "width": FUYU_MAX_SIZE[1]}
    if not isinstance(size, dict) or "height" not in size or "width" not in size:
        raise ValueError(f"from_hf_fuyu: the image processor's size must be {{'height', 'width'}}, got {size!r}")
    return [int(size["height"]), int(size["width"])]


def _pad_colour(settings: dict) -> list[int]:
    """Fuyu's ``padding_value`` (applied to 0–255 pixels before rescaling) as an RGB colour."""
    value = settings.get("padding_value", FUYU_PAD_COLOUR[0])
    if settings.get("padding_mode", "constant") != "constant" or not 0 <= value <= 255 or value != int(value):
        raise ValueError(f"from_hf_fuyu: only constant padding with an integer pixel value 0–255 is supported, got "
                         f"padding_mode {settings.get('padding_mode')!r}, padding_value {value!r}")
    return [int(value)] * 3


def _check_patch_size(settings: dict, patch: int) -> None:
    size = settings.get("patch_size")
    if size is not None and (size.get("height"), size.get("width")) != (patch, patch):
        raise ValueError(f"from_hf_fuyu: the image processor's patch_size {size} differs from the model's "
                         f"patch_size {patch}")


# -- export ------------------------------------------------------------------------------------
def to_hf_fuyu(model: MultimodalModel) -> FuyuForCausalLM:
    """Export a Fuyu-shaped :class:`MultimodalModel` as a plain ``FuyuForCausalLM``.

    Requires the ``patch`` encoder, an ``mlp`` bridge of depth 1 with bias, the ``native`` high-resolution strategy
    and an HF decoder-only causal LM; LoRA adapters are merged into the weights. The result has identical weights
    and logits and is in eval mode. The image side of Fuyu lives in its processor: ``FuyuImageProcessor(size=
    max_size, patch_size=…, padding_value=pad colour, image_mean/std=…)`` reproduces the native strategy's crops.
    """
    _check_exportable(model)
    vision: PatchEncoder = model.vision
    text_config = copy.deepcopy(model.llm.model.config)
    config = FuyuConfig(text_config=text_config, image_size=int(vision.config.image_size),
                        patch_size=vision.patch_size, num_channels=3, image_token_id=model.image_token_id,
                        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    hf_model = empty_model(lambda: FuyuForCausalLM(config))
    _load_exactly(hf_model, _rename(merged_state_dict(model), _prefix_pairs(model.llm), source=0), "FuyuForCausalLM")
    hf_model.generation_config = copy.deepcopy(model.llm.model.generation_config)
    hf_model.eval()
    return hf_model


def _check_exportable(model: MultimodalModel) -> None:
    """Raise ``ValueError`` unless the model has exactly Fuyu's structure."""
    if not isinstance(model.vision, PatchEncoder):
        raise ValueError(f"to_hf_fuyu needs the 'patch' vision encoder (Fuyu has no vision tower), "
                         f"got {type(model.vision).__name__}")
    if not isinstance(model.bridge, MLPBridge) or model.bridge.depth != 1:
        depth = f" of depth {model.bridge.depth}" if isinstance(model.bridge, MLPBridge) else ""
        raise ValueError(f"to_hf_fuyu needs an 'mlp' bridge of depth 1 (Fuyu's vision_embed_tokens, one Linear), "
                         f"got {type(model.bridge).__name__}{depth}")
    if model.bridge.linear_1.bias is None:
        raise ValueError("to_hf_fuyu: Fuyu's vision_embed_tokens has a bias; this mlp bridge has bias: false")
    if not isinstance(model.highres, Native):
        name = "none" if model.highres is None else type(model.highres).__name__
        raise ValueError(f"to_hf_fuyu needs the 'native' high-resolution strategy (Fuyu's variable-size patch "
                         f"grid with row ends), got {name}")
    if not isinstance(model.llm, LanguageModel) or not isinstance(model.llm.model, PreTrainedModel) \
            or model.llm.is_encoder_decoder:
        raise ValueError(f"to_hf_fuyu needs an HF causal LM (Fuyu is decoder-only), got "
                         f"{type(model.llm).__name__} around {type(model.llm.model).__name__}")


# -- weights -----------------------------------------------------------------------------------
def _prefix_pairs(llm: LanguageModel) -> list[tuple[str, str]]:
    """``(mmbridge prefix, HF Fuyu prefix)`` for each part; the text body's prefix comes from the LM class."""
    causal_lm = llm.model
    output_embeddings = causal_lm.get_output_embeddings()
    head = next((name for name, module in causal_lm.named_modules() if module is output_embeddings), None)
    if output_embeddings is None or head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no LM head module; Fuyu needs one (lm_head)")
    return [("bridge.linear_1.", "model.vision_embed_tokens."),
            (f"llm.model.{causal_lm.base_model_prefix}.", "model.language_model."),
            (f"llm.model.{head}.", "lm_head.")]
