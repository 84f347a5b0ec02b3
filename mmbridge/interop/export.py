"""Write an mmbridge model as a complete transformers directory (``mmbridge export --format hf``).

:func:`export_hf` converts a :class:`~mmbridge.model.multimodal.MultimodalModel` to the transformers class of
its shape with the in-memory converters of :mod:`mmbridge.interop` (LoRA merged) and writes into one directory
everything ``AutoProcessor.from_pretrained`` and the model class need — the files vLLM, lmms-eval and TRL read:

* ``config.json``, ``model.safetensors``, ``generation_config.json`` (decoding as mmbridge's ``chat``: its EOS
  ids, the image token banned);
* the tokenizer and its chat template (``chat_template.jinja``; a saved ``system_prompt`` becomes the template's
  default system turn, as mmbridge's processor inserts it), with the image token as a special token at the
  model's image token id (added when the id is the tokenizer's next free one);
* ``processor_config.json`` (the processor class and settings, image processor nested, as transformers 5 writes
  it) and ``preprocessor_config.json`` (the image processor alone, as older transformers and vLLM read it).

Families (mmbridge shape → model class, processor class with its image processor):

* HF tower + ``mlp`` of depth 2 → ``LlavaForConditionalGeneration``, ``LlavaProcessor`` (``LlavaImageProcessor``);
* the same + ``anyres`` → ``LlavaNextForConditionalGeneration``, ``LlavaNextProcessor``
  (``LlavaNextImageProcessor``);
* ``patch`` + ``mlp`` of depth 1 + ``native`` → ``FuyuForCausalLM``, ``FuyuProcessor`` (``FuyuImageProcessor``);
* BLIP tower + ``qformer`` → ``Blip2ForConditionalGeneration``, ``Blip2Processor`` (``BlipImageProcessor``);
* BLIP tower + ``instruct_qformer`` → ``InstructBlipForConditionalGeneration``, ``InstructBlipProcessor``
  (``BlipImageProcessor``, and the Q-Former tokenizer);
* CLIP tower + ``gated_xattn`` with IDEFICS' perceiver → ``IdeficsForVisionText2Text``, ``IdeficsProcessor``
  (``IdeficsImageProcessor``).

Anything else is a ``ValueError`` naming the part without a counterpart (deep-fusion bridges, UHD / Monkey
strategies, encoders other than HF towers, bridges other than those above).

The image processor reproduces the model's :class:`~mmbridge.model.vision.transform.ImageTransform`:
shortest-edge or exact resize, center crop, resample filter, rescale, mean/std, and LLaVA-1.5's pad-to-square
as ``LlavaImageProcessor``'s ``do_pad``. Nothing is renamed into place before the written directory passes
three checks, on the processor transformers loads back from it: its settings read back
(:meth:`ImageTransform.from_hf`) to the model's transform; its pixels for probe images of several aspect ratios
equal mmbridge's (all families but Fuyu, whose pixels are padded to the maximum size); and for LLaVA and
LLaVA-NeXT its ``input_ids`` for a chat-templated question with an image equal mmbridge's processor's (BLIP-2,
InstructBLIP, Fuyu and IDEFICS processors lay the image tokens out their own way: before the text, or as
IDEFICS' ``<fake_token_around_image>`` runs).

Writing is atomic: everything goes into a temporary directory beside ``out`` that replaces it in one rename at
the end, so a failure leaves nothing half-written; a non-empty ``out`` is only replaced with ``force``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers import (AddedToken, AutoProcessor, Blip2Processor, FuyuProcessor, IdeficsProcessor,
                          InstructBlipProcessor, LlavaNextProcessor, LlavaProcessor, PreTrainedModel)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from mmbridge.generate import default_eos_ids
from mmbridge.interop.blip2 import to_hf_blip2, to_hf_instructblip
from mmbridge.interop.fuyu import FUYU_ROW_END, _max_size, _pad_colour, _transform_fields, to_hf_fuyu
from mmbridge.interop.idefics import to_hf_idefics
from mmbridge.interop.llava import export_strategy, to_hf_llava
from mmbridge.interop.llava_next import grid_to_pinpoints, to_hf_llava_next
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.vision.hf import HFVisionEncoder
from mmbridge.model.vision.transform import ImageTransform, resample_filter
from mmbridge.utils import make_shareable

__all__ = ["export_hf", "hf_family", "Exported", "FAMILIES"]

FUSION_BRIDGES = ("visual_expert", "mma", "moe")  # parameters inside the LLM's layers: no transformers class
EXPORTABLE = ("mlp (LLaVA, LLaVA-NeXT, Fuyu), qformer (BLIP-2), instruct_qformer (InstructBLIP), "
              "gated_xattn (IDEFICS)")
PIXEL_TOLERANCE = 1e-5
PROBE_SIZES = ((37, 23), (23, 52), (40, 40))  # (height, width) of the probe images: tall, wide, square
PROBE_QUESTION = "Describe the image."
FUYU_IMAGE_TOKEN = "|SPEAKER|"


class Exported(NamedTuple):
    """What :func:`export_hf` wrote: the directory and the transformers classes that load it."""

    path: str
    model_class: str
    processor_class: str


@dataclass(frozen=True)
class Family:
    """One transformers family: its converter, its processor builder, the check that its saved image-processor
    settings read back to the model's, whether its pixels can be compared with mmbridge's (Fuyu's are padded to
    the maximum size) and whether its processor places the image tokens at mmbridge's ``<image>`` placeholder
    (so prompt ids can be compared)."""

    name: str
    convert: Callable[[MultimodalModel], PreTrainedModel]
    processor: Callable[[MultimodalModel, Any], Any]
    check_settings: Callable[[MultimodalModel, dict, str], None]
    same_pixels: bool = True
    same_prompt: bool = False


# -- public ----------------------------------------------------------------------------------------
def export_hf(model: MultimodalModel, out: str | os.PathLike, force: bool = False) -> Exported:
    """Write ``model`` as a transformers directory ``out`` (weights with LoRA merged, config, tokenizer with its
    chat template, ``processor_config.json`` and ``preprocessor_config.json``); see the module docstring.

    A model without a transformers counterpart, or whose image processing no transformers processor reproduces,
    is a ``ValueError``; an ``out`` that is a file, or a non-empty directory without ``force``, is a
    ``FileExistsError``. Either way nothing is written.
    """
    out = os.path.abspath(os.fspath(out))
    _check_target(out, force)
    family = FAMILIES[hf_family(model)]
    hf_model = family.convert(model)
    tokenizer = export_tokenizer(model)
    processor = family.processor(model, tokenizer)
    processor.chat_template = tokenizer.chat_template
    _match_generation(hf_model, model, tokenizer)

    def write(directory: str) -> None:
        hf_model.save_pretrained(directory)
        processor.save_pretrained(directory)
        processor.image_processor.save_pretrained(directory)  # preprocessor_config.json, for older readers
        verify(model, directory, family)

    _write_atomically(out, force, write)
    return Exported(out, type(hf_model).__name__, type(processor).__name__)


def _match_generation(hf_model: PreTrainedModel, model: MultimodalModel, tokenizer: Any) -> None:
    """Give ``hf_model`` a generation config that decodes as mmbridge's ``chat``: the same EOS ids, the tokenizer's
    pad id, and the image token banned (a generated placeholder would have no pixels behind it)."""
    config = copy.deepcopy(hf_model.generation_config)
    config.eos_token_id = _single_or_list(default_eos_ids(model))
    config.pad_token_id = tokenizer.pad_token_id
    config.bad_words_ids = [[model.image_token_id]]
    hf_model.generation_config = config


def hf_family(model: MultimodalModel) -> str:
    """The key in :data:`FAMILIES` of the transformers class ``model`` exports to; a ``ValueError`` naming the part
    without a transformers counterpart otherwise (the converter then checks the finer structure)."""
    bridge = _kind(model.config.bridge)
    highres = _kind(model.config.highres) if model.highres is not None else None
    if bridge in FUSION_BRIDGES:
        raise ValueError(f"bridge {bridge} (deep fusion: its parameters live inside the LLM's layers) has no "
                         f"transformers counterpart; exportable bridges: {EXPORTABLE}")
    if bridge in ("gated_xattn", "qformer", "instruct_qformer"):
        if highres is not None:
            raise ValueError(f"high-resolution strategy {highres} on a {bridge} bridge has no transformers "
                             f"counterpart; transformers' high-resolution classes are LLaVA-NeXT (anyres) and "
                             f"Fuyu (native), both with an mlp bridge")
        return {"gated_xattn": "idefics", "qformer": "blip2", "instruct_qformer": "instructblip"}[bridge]
    if bridge != "mlp":
        hint = " (a perceiver exports only as IDEFICS' resampler inside a gated_xattn bridge)" \
            if bridge == "perceiver" else ""
        raise ValueError(f"bridge {bridge} has no transformers counterpart{hint}; exportable bridges: {EXPORTABLE}")
    if highres == "native":
        if _kind(model.config.vision) != "patch":
            raise ValueError(f"vision encoder {_vision_name(model)} has no transformers counterpart at native "
                             f"resolution; Fuyu export needs the 'patch' encoder (Fuyu has no vision tower)")
        return "fuyu"
    if highres not in (None, "anyres"):
        raise ValueError(f"high-resolution strategy {highres} has no transformers counterpart; LLaVA-NeXT export "
                         f"needs 'anyres', Fuyu export 'native'")
    target = "LLaVA-NeXT" if highres else "LLaVA"
    if not isinstance(model.vision, HFVisionEncoder):
        raise ValueError(f"vision encoder {_vision_name(model)} has no transformers counterpart; {target} export "
                         f"needs an HF tower ('hf' encoder: CLIP, SigLIP, ...)")
    return "llava_next" if highres else "llava"


def export_tokenizer(model: MultimodalModel) -> Any:
    """A copy of the model's tokenizer holding the image token at the model's image token id, its chat template
    led by the model's saved system prompt (if any)."""
    tokenizer = copy.deepcopy(model.tokenizer)
    token, token_id = model.config.image_token, model.image_token_id
    held = tokenizer.get_vocab().get(token)
    if held is None and token_id == len(tokenizer):
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    elif held != token_id:
        where = f"holds {token!r} as id {held}" if held is not None else \
            f"lacks {token!r} and its next free id is {len(tokenizer)}"
        raise ValueError(f"the model's image token {token!r} has id {token_id} but the tokenizer {where}; "
                         f"transformers' processors find the image token by its text, so it must be that id")
    system = model.processor_settings.get("system_prompt")
    if system is not None and tokenizer.chat_template:
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, system)
    return tokenizer


def with_default_system(template: str, system: str) -> str:
    """``template`` preceded by a system turn holding ``system`` when the conversation has none — what mmbridge's
    processor does with a saved ``system_prompt``."""
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja string literal
    return (f"{{% if not messages or messages[0]['role'] != 'system' %}}{{% set messages = "
            f"[{{'role': 'system', 'content': {literal}}}] + messages %}}{{% endif %}}" + template)


# -- image processors --------------------------------------------------------------------------------
def image_settings(transform: ImageTransform) -> dict[str, Any]:
    """transformers image-processor settings reproducing ``transform`` (LLaVA's ``do_pad`` for pad-to-square)."""
    height, width = transform.size
    size = {"shortest_edge": height} if transform.resize == "shortest_edge" else {"height": height, "width": width}
    crop = transform.crop or transform.output_size  # a crop size is read for token counts even when unused
    return {"do_resize": transform.resize != "none", "size": size, "do_center_crop": transform.crop is not None,
            "crop_size": {"height": crop[0], "width": crop[1]}, "resample": int(resample_filter(transform.resample)),
            "do_rescale": transform.rescale != 1.0, "rescale_factor": transform.rescale, "do_normalize": True,
            "image_mean": list(transform.mean), "image_std": list(transform.std), "do_convert_rgb": True,
            "do_pad": transform.pad_to_square}


def _effective(transform: ImageTransform) -> tuple:
    """The settings that change ``transform``'s pixels (a shortest-edge resize reads one side, none reads none)."""
    size = {"shortest_edge": transform.size[0], "exact": tuple(transform.size), "none": None}[transform.resize]
    return (transform.resize, size, transform.crop, transform.resample, transform.rescale, tuple(transform.mean),
            tuple(transform.std), transform.pad_to_square)


def _no_pad_to_square(model: MultimodalModel, processor_class: str) -> None:
    """Refuse LLaVA-1.5's pad-to-square where the image processor has no such step."""
    if model.vision.transform.pad_to_square:
        raise ValueError(f"the image transform pads to a square (LLaVA-1.5's image_aspect_ratio 'pad'), which "
                         f"{processor_class} cannot do; only LLaVA's image processor has it (do_pad)")


def _plain_settings(model: MultimodalModel) -> dict[str, Any]:
    """:func:`image_settings` for image processors without LLaVA's pad-to-square."""
    return {key: value for key, value in image_settings(model.vision.transform).items() if key != "do_pad"}


# -- processors --------------------------------------------------------------------------------------
def _llava_processor(model: MultimodalModel, tokenizer: Any) -> LlavaProcessor:
    vision: HFVisionEncoder = model.vision
    return LlavaProcessor(image_processor=LlavaImageProcessorPil(**image_settings(vision.transform)),
                          tokenizer=tokenizer, patch_size=int(vision.model.config.patch_size),
                          vision_feature_select_strategy=export_strategy(vision),
                          num_additional_image_tokens=int(vision.has_cls), chat_template=tokenizer.chat_template,
                          image_token=model.config.image_token)


def _llava_next_processor(model: MultimodalModel, tokenizer: Any) -> LlavaNextProcessor:
    vision: HFVisionEncoder = model.vision
    tile = int(vision.model.config.image_size)
    settings = {**_plain_settings(model), "do_resize": True, "size": {"shortest_edge": tile},
                "do_center_crop": True, "crop_size": {"height": tile, "width": tile}, "do_pad": True,
                "image_grid_pinpoints": grid_to_pinpoints(model.highres.cfg.grid, tile)}
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**settings), tokenizer=tokenizer,
                              patch_size=int(vision.model.config.patch_size),
                              vision_feature_select_strategy=export_strategy(vision),
                              num_additional_image_tokens=int(vision.has_cls), chat_template=tokenizer.chat_template,
                              image_token=model.config.image_token)


def _blip2_processor(model: MultimodalModel, tokenizer: Any) -> Blip2Processor:
    _needs_image_token(model, "<image>", "Blip2Processor")
    _no_pad_to_square(model, "BlipImageProcessor")
    return Blip2Processor(image_processor=BlipImageProcessorPil(**_plain_settings(model)), tokenizer=tokenizer,
                          num_query_tokens=model.tokens_per_image)


def _instructblip_processor(model: MultimodalModel, tokenizer: Any) -> InstructBlipProcessor:
    _needs_image_token(model, "<image>", "InstructBlipProcessor")
    _no_pad_to_square(model, "BlipImageProcessor")
    qformer_tokenizer = getattr(model.bridge, "tokenizer", None)
    if qformer_tokenizer is None:
        raise ValueError("InstructBLIP export needs the Q-Former's instruction tokenizer (the instruct_qformer "
                         "bridge's tokenizer), and this model has none")
    return InstructBlipProcessor(image_processor=BlipImageProcessorPil(**_plain_settings(model)), tokenizer=tokenizer,
                                 qformer_tokenizer=copy.deepcopy(qformer_tokenizer),
                                 num_query_tokens=model.tokens_per_image)


def _idefics_processor(model: MultimodalModel, tokenizer: Any) -> IdeficsProcessor:
    _needs_image_token(model, "<image>", "IdeficsProcessor")
    _no_pad_to_square(model, "IdeficsImageProcessor")
    transform = model.vision.transform
    side = int(model.vision.model.config.image_size)
    if transform.resize != "exact" or transform.crop is not None or tuple(transform.size) != (side, side):
        raise ValueError(f"IdeficsImageProcessor resizes every image to exactly image_size x image_size "
                         f"({side}x{side}); this model's transform (resize {transform.resize!r}, size "
                         f"{tuple(transform.size)}, crop {transform.crop}) differs; set the vision encoder's "
                         f"image_processor to size {{'height': {side}, 'width': {side}}} without a center crop")
    image_processor = IdeficsImageProcessorPil(**_plain_settings(model), image_size=side)
    return IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=side)


def _fuyu_processor(model: MultimodalModel, tokenizer: Any) -> FuyuProcessor:
    _needs_image_token(model, FUYU_IMAGE_TOKEN, "FuyuProcessor")
    cfg, vision = model.highres.cfg, model.vision
    if cfg.row_end != FUYU_ROW_END or FUYU_ROW_END not in tokenizer.get_vocab():
        raise ValueError(f"FuyuProcessor ends every row of patches with the token {FUYU_ROW_END!r}; this model's "
                         f"row end is {cfg.row_end!r} (the native strategy's row_end), and the tokenizer must hold "
                         f"{FUYU_ROW_END!r}")
    if len(set(cfg.pad_colour)) != 1:
        raise ValueError(f"FuyuImageProcessor pads with one value on every channel (padding_value); this model's "
                         f"pad_colour is {cfg.pad_colour}")
    transform = vision.transform
    size = {"height": cfg.max_size[0], "width": cfg.max_size[1]} if cfg.max_size else None
    settings = {"do_resize": size is not None, **({"size": size} if size else {}),
                "patch_size": {"height": vision.patch_size, "width": vision.patch_size},
                "padding_value": float(cfg.pad_colour[0]), "resample": int(resample_filter(transform.resample)),
                "do_rescale": transform.rescale != 1.0, "rescale_factor": transform.rescale,
                "image_mean": list(transform.mean), "image_std": list(transform.std)}
    return FuyuProcessor(image_processor=FuyuImageProcessorPil(**settings), tokenizer=tokenizer)


def _needs_image_token(model: MultimodalModel, token: str, processor_class: str) -> None:
    """``processor_class`` writes ``token`` for images; the model's image token must be it."""
    if model.config.image_token != token:
        raise ValueError(f"{processor_class} writes {token!r} for images; this model's image token is "
                         f"{model.config.image_token!r} (id {model.image_token_id})")


# -- verification ------------------------------------------------------------------------------------
def verify(model: MultimodalModel, directory: str, family: Family) -> None:
    """Load ``directory``'s processor with transformers alone and check it against the model: image token id,
    image settings, pixels and (LLaVA, LLaVA-NeXT) prompt ids; a ``ValueError`` names the first difference."""
    processor = AutoProcessor.from_pretrained(directory)
    with open(os.path.join(directory, "preprocessor_config.json")) as handle:
        settings = json.load(handle)
    _check_image_token(model, processor, family)
    family.check_settings(model, settings, family.name)
    images = probe_images()
    if family.same_pixels:
        _check_pixels(model, processor, images, family)
    if family.same_prompt and model.tokenizer.chat_template:
        _check_prompt(model, processor, images, family)


def probe_images() -> list[Image.Image]:
    """Deterministic RGB images of :data:`PROBE_SIZES` (gradients plus noise, so every resize and crop shows)."""
    generator = np.random.default_rng(0)
    images = []
    for height, width in PROBE_SIZES:
        rows, cols = np.mgrid[0:height, 0:width]
        pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 127 // (height + width)], -1)
        pixels = np.clip(pixels + generator.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def _check_image_token(model: MultimodalModel, processor: Any, family: Family) -> None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
    if token_id != model.image_token_id:
        raise ValueError(f"the exported {family.name} processor writes image token id {token_id}, the model reads "
                         f"{model.image_token_id}")


SETTING_NAMES = ("resize", "size", "crop", "resample", "rescale", "mean", "std", "pad_to_square")


def _check_llava_settings(model: MultimodalModel, settings: dict, name: str) -> None:
    """LLaVA's saved settings read back to the model's transform, ``do_pad`` as pad-to-square."""
    _compare_settings(model, ImageTransform.from_hf(settings, pad_to_square=bool(settings.get("do_pad"))),
                      SETTING_NAMES, name)


def _check_plain_settings(model: MultimodalModel, settings: dict, name: str) -> None:
    """BLIP's and IDEFICS' saved settings read back to the model's transform (they never pad to a square)."""
    _compare_settings(model, ImageTransform.from_hf(settings), SETTING_NAMES, name)


def _check_tile_settings(model: MultimodalModel, settings: dict, name: str) -> None:
    """LLaVA-NeXT's processor cuts the tiles itself; the tiles' pixel treatment must read back to the model's."""
    _compare_settings(model, ImageTransform.from_hf(settings), ("resample", "rescale", "mean", "std"), name)
    tile = int(model.vision.model.config.image_size)
    pinpoints = grid_to_pinpoints(model.highres.cfg.grid, tile)
    if settings.get("image_grid_pinpoints") != pinpoints:
        raise ValueError(f"the {name} image processor's image_grid_pinpoints {settings.get('image_grid_pinpoints')} "
                         f"are not the model's anyres grid {pinpoints}")


def _compare_settings(model: MultimodalModel, saved: ImageTransform, names: tuple[str, ...], family: str) -> None:
    """``names`` of :data:`SETTING_NAMES` must agree between the model's transform and the saved one."""
    ours = {name: value for name, value in zip(SETTING_NAMES, _effective(model.vision.transform)) if name in names}
    theirs = {name: value for name, value in zip(SETTING_NAMES, _effective(saved)) if name in names}
    if ours != theirs:
        diff = {name: (ours[name], theirs[name]) for name in names if ours[name] != theirs[name]}
        raise ValueError(f"the {family} image processor's settings do not read back to the model's image "
                         f"transform: (model, exported) {diff}")


def _check_fuyu_settings(model: MultimodalModel, settings: dict, name: str) -> None:
    """Fuyu's saved settings read back (as :func:`~mmbridge.interop.from_hf_fuyu` reads them) to the model's."""
    cfg, transform = model.highres.cfg, model.vision.transform
    expected = ({"resample": transform.resample, "rescale": transform.rescale, "mean": list(transform.mean),
                 "std": list(transform.std)}, cfg.max_size, list(cfg.pad_colour))
    read = (_transform_fields(settings), _max_size(settings), _pad_colour(settings))
    if read != expected:
        raise ValueError(f"the {name} image processor's settings do not read back to the model's: exported {read}, "
                         f"model {expected} (normalisation, max size, pad colour)")


def _check_pixels(model: MultimodalModel, processor: Any, images: list[Image.Image], family: Family) -> None:
    """transformers' pixels for each probe image equal mmbridge's (every crop, for LLaVA-NeXT)."""
    for image in images:
        output = processor.image_processor(images=[image], return_tensors="pt")
        theirs = output if isinstance(output, torch.Tensor) else output["pixel_values"]
        ours = _mmbridge_pixels(model, image)
        if theirs.numel() != ours.numel():
            raise ValueError(f"the exported {family.name} image processor turns a {image.width}x{image.height} "
                             f"image into {tuple(theirs.shape)} pixels, mmbridge into {tuple(ours.shape)}")
        error = float((theirs.reshape(-1) - ours.reshape(-1)).abs().max())
        if error > PIXEL_TOLERANCE:
            raise ValueError(f"the exported {family.name} image processor's pixels for a {image.width}x"
                             f"{image.height} image differ from mmbridge's by up to {error:.3g}")


def _mmbridge_pixels(model: MultimodalModel, image: Image.Image) -> torch.Tensor:
    """What mmbridge's processor feeds the encoder for ``image``: ``[3, H, W]``, or its crops ``[n, 3, H, W]``."""
    if model.highres is None:
        return model.vision.transform(image)
    return model.highres.pixel_values(image)


def _check_prompt(model: MultimodalModel, processor: Any, images: list[Image.Image], family: Family) -> None:
    """transformers' ``input_ids`` for a chat-templated question about each probe image equal mmbridge's."""
    ours_processor = _mmbridge_processor(model)
    messages = [{"role": "user", "content": f"{model.config.image_token}\n{PROBE_QUESTION}"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for image in images:
        theirs = list(processor(text=text, images=[image], add_special_tokens=False)["input_ids"][0])
        ours = ours_processor.prompt_inputs(PROBE_QUESTION, [image])["input_ids"].tolist()
        if theirs != ours:
            raise ValueError(f"the exported {family.name} processor's prompt ids for a {image.width}x{image.height} "
                             f"image differ from mmbridge's ({len(theirs)} vs {len(ours)} tokens, "
                             f"{theirs.count(model.image_token_id)} vs {ours.count(model.image_token_id)} "
                             f"image tokens)")


def _mmbridge_processor(model: MultimodalModel) -> Any:
    """The model's own processor; when its tokenizer lacks the image token (a model imported with a pinned id),
    the same processor over the exported tokenizer, which holds it."""
    if model.config.image_token in model.tokenizer.get_vocab():
        return model.processor()
    from mmbridge.data.processor import ImageTokens, Processor, TextSettings

    image_tokens = ImageTokens(per_image=model.tokens_per_image, placeholder=model.config.image_token,
                               token_id=model.image_token_id)
    return Processor(export_tokenizer(model), model.vision.transform, image_tokens,
                     text_settings=TextSettings(**model.processor_settings), highres=model.highres)


FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA", to_hf_llava, _llava_processor, _check_llava_settings, same_prompt=True),
    "llava_next": Family("LLaVA-NeXT", to_hf_llava_next, _llava_next_processor, _check_tile_settings,
                         same_prompt=True),
    "fuyu": Family("Fuyu", to_hf_fuyu, _fuyu_processor, _check_fuyu_settings, same_pixels=False),
    "blip2": Family("BLIP-2", to_hf_blip2, _blip2_processor, _check_plain_settings),
    "instructblip": Family("InstructBLIP", to_hf_instructblip, _instructblip_processor, _check_plain_settings),
    "idefics": Family("IDEFICS", to_hf_idefics, _idefics_processor, _check_plain_settings),
}


# -- writing -----------------------------------------------------------------------------------------
def _check_target(out: str, force: bool) -> None:
    """``out`` may be absent, an empty directory, or (with ``force``) a non-empty one; never a file."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"export target {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise FileExistsError(f"export target {out} is not empty; pass --force (force=True) to replace it")


def _write_atomically(out: str, force: bool, write: Callable[[str], None]) -> None:
    """Run ``write`` on a temporary directory beside ``out``, then swap it in; on failure it is removed and ``out``
    is untouched."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    try:
        write(staging)
        make_shareable(staging)
        _check_target(out, force)  # again: something may have appeared meanwhile
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: str, out: str) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and deleted once replaced."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    aside = staging + ".old"
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# -- helpers -----------------------------------------------------------------------------------------
def _kind(spec: Any) -> str | None:
    """The ``type`` of a component spec (config dataclass or dict)."""
    return spec.get("type") if isinstance(spec, dict) else getattr(spec, "type", None)


def _vision_name(model: MultimodalModel) -> str:
    """The vision encoder as a user names it: its type (an HF tower's model type, a module's target)."""
    spec = model.config.vision
    kind = _kind(spec)
    if kind == "module":
        target = spec.get("target") if isinstance(spec, dict) else getattr(spec, "target", None)
        return f"module {target}"
    return str(kind)


def _single_or_list(ids: list[int]) -> int | list[int] | None:
    """One id as an int (as HF configs usually hold it), several as a list, none as None."""
    return None if not ids else ids[0] if len(ids) == 1 else ids
