"""Import from and export to transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6).

LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") is LLaVA plus
AnyRes: :func:`from_hf_llava_next` builds what :func:`~mmbridge.interop.llava.from_hf_llava` builds (HF
tower, depth-2 ``mlp`` bridge, HF causal LM, image token id pinned) and adds the
:class:`~mmbridge.model.highres.anyres.AnyRes` strategy, so images of any aspect ratio give the same
tokens and logits as transformers. :func:`to_hf_llava_next` goes the other way, LoRA merged.

What maps to what:

* ``image_grid_pinpoints`` (candidate resolutions, (height, width) in pixels) ↔ ``AnyResConfig.grid``
  ([rows, cols] of encoder tiles; the tile is ``vision_config.image_size``). A pinpoint that is not a whole
  number of tiles is refused: transformers counts the crops of such a resolution rounding up
  (``image_size_to_num_patches``) but their token grid rounding down (``get_anyres_image_grid_shape``),
  so no tile layout reproduces it;
* ``model.image_newline`` ↔ ``bridge.image_newline``; transformers always unpads and always ends each row
  with it, so the strategy is ``anyres`` with ``newline`` and ``unpad`` on;
* feature selection as for LLaVA, but it must leave each tile's patch grid: ``"default"`` on a CLS
  tower (CLIP, ViT) and ``"full"`` on SigLIP. ``"full"`` on CLIP keeps the CLS token, ``"default"`` on
  SigLIP drops a patch; transformers cannot stitch either, so both are refused.

Inputs: transformers pads every image's crops to the most crops of a batch (``pixel_values``
``[n_images, max_crops, 3, H, W]``); :func:`llava_next_inputs` keeps each image's own crops (``[n_crops, 3, H, W]``,
what the model takes with ``image_sizes``): ``model(**llava_next_inputs(model, hf_batch))``.

Weights, memory, tokenizer and directories behave as in :mod:`mmbridge.interop.llava`, whose steps are
reused; from a directory the image-processor settings (mean, std, resample) are read, and pinpoints saved
there must agree with the model config's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from mmbridge.interop.llava import (_directory_image_processor, check_exportable, export_fields, export_weights,
                                    import_config, import_tokenizer, import_weights, open_hf_model)
from mmbridge.model.highres.anyres import AnyRes, AnyResConfig
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.vision.hf import tower_has_cls

__all__ = ["from_hf_llava_next", "to_hf_llava_next", "llava_next_inputs", "pinpoints_to_grid", "grid_to_pinpoints"]

NEWLINE_PAIR = (("bridge.image_newline", "model.image_newline"),)  # mmbridge name, HF name


# -- import ------------------------------------------------------------------------------------
def from_hf_llava_next(model_or_dir: LlavaNextForConditionalGeneration | str | os.PathLike,
                       tokenizer: Any = None) -> MultimodalModel:
    """Build a :class:`MultimodalModel` with the weights, token layout and logits of an HF LLaVA-NeXT.

    ``model_or_dir``: a ``LlavaNextForConditionalGeneration`` or a directory written by its
    ``save_pretrained`` (tokenizer and image-processor settings are read from it too); ``tokenizer``
    overrides the directory's, and one of the two is required. Returns the model in eval mode.
    """
    caller = "from_hf_llava_next"
    hf_model, directory = open_hf_model(model_or_dir, LlavaNextForConditionalGeneration, caller)
    tokenizer = import_tokenizer(tokenizer, directory, caller)
    hf_config = hf_model.config
    _check_grid_select(hf_config.vision_feature_select_strategy, hf_config.vision_config)
    tile = int(hf_config.vision_config.image_size)
    grid = pinpoints_to_grid(hf_config.image_grid_pinpoints, tile)
    image_processor = _directory_image_processor(directory)
    _check_processor_pinpoints(image_processor, hf_config.image_grid_pinpoints)
    config = dataclasses.replace(import_config(hf_model, tokenizer, image_processor),
                                 highres=AnyResConfig(grid=grid, newline=True, unpad=True))
    model = import_weights(hf_model, config, tokenizer, share=directory is not None, extra_pairs=NEWLINE_PAIR)
    _check_tile(model, caller)
    return model


def llava_next_inputs(model: MultimodalModel, hf_inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MultimodalModel.forward``/``generate`` for the tensors transformers' LLaVA-NeXT
    takes: ``pixel_values`` ``[n_images, max_crops, 3, H, W]`` (crops past each image's count padded) become each
    image's own crops ``[n_crops, 3, H, W]``, in order; the rest (``image_sizes`` included) is kept."""
    inputs = dict(hf_inputs)
    pixel_values, sizes = hf_inputs.get("pixel_values"), hf_inputs.get("image_sizes")
    if pixel_values is not None and pixel_values.dim() == 5:
        if sizes is None:
            raise ValueError("LLaVA-NeXT pixel_values [n_images, max_crops, 3, H, W] need image_sizes [n_images, 2]")
        counts = [len(model.highres.layout(tuple(size)).crops) for size in sizes.tolist()]
        inputs["pixel_values"] = torch.cat([row[:count] for row, count in zip(pixel_values, counts)])
    return inputs


def pinpoints_to_grid(pinpoints: Any, tile: int) -> list[list[int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` ((height, width) in pixels) → AnyRes ``[rows, cols]`` of ``tile``-pixel
    tiles; every side must be a positive multiple of ``tile``."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width], got {pinpoints!r}")
    grid = []
    for point in pinpoints:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ValueError(f"image_grid_pinpoints entries are [height, width] in pixels, got {point!r}")
        height, width = (int(side) for side in point)
        if min(height, width) < tile or height % tile or width % tile:
            raise ValueError(f"image_grid_pinpoints entry {[height, width]} (height, width) is not a whole number of "
                             f"{tile}x{tile} tiles (vision_config.image_size {tile}): transformers counts the crops "
                             f"of such a resolution rounding up but lays out their tokens rounding down, so mmbridge's "
                             f"anyres grid ([rows, cols] of tiles) cannot reproduce it; use multiples of {tile}")
        grid.append([height // tile, width // tile])
    return grid


def _check_grid_select(strategy: str, vision_config: Any) -> None:
    """Refuse a feature selection whose tokens per tile are not the tile's patch grid (transformers cannot
    stitch them either)."""
    has_cls = tower_has_cls(vision_config.model_type)
    if strategy not in ("default", "full") or has_cls == (strategy == "default"):
        return
    side = vision_config.image_size // vision_config.patch_size
    count = side * side + (1 if has_cls else -1)
    fix = "'default' (drops the CLS token)" if has_cls else "'full' (SigLIP has no CLS token to drop)"
    raise ValueError(f"from_hf_llava_next: vision_feature_select_strategy {strategy!r} on a {vision_config.model_type} "
                     f"tower leaves {count} tokens per tile, not its {side}x{side} patch grid, which LLaVA-NeXT "
                     f"stitches; this tower needs {fix}")


def _check_processor_pinpoints(image_processor: dict | None, pinpoints: list) -> None:
    """The directory's image processor must cut the resolutions the model lays out."""
    saved = (image_processor or {}).get("image_grid_pinpoints")
    if saved is not None and [list(point) for point in saved] != [list(point) for point in pinpoints]:
        raise ValueError(f"from_hf_llava_next: the saved image processor's image_grid_pinpoints {saved} differ from "
                         f"the model config's {pinpoints}; the token counts would not match the model")


def _check_tile(model: MultimodalModel, caller: str) -> None:
    """The encoder's input (the transform's output size) must be the square tile LLaVA-NeXT's model assumes."""
    tile = int(model.vision.model.config.image_size)
    if tuple(model.highres.encoder_size) != (tile, tile):
        raise ValueError(f"{caller}: the image transform produces {tuple(model.highres.encoder_size)} (height, width) "
                         f"crops but LLaVA-NeXT tiles are vision_config.image_size {tile}x{tile}; set the image "
                         f"processor's size/crop_size to {tile}")


# -- export ------------------------------------------------------------------------------------
def to_hf_llava_next(model: MultimodalModel) -> LlavaNextForConditionalGeneration:
    """Export an anyres LLaVA-shaped :class:`MultimodalModel` as a plain ``LlavaNextForConditionalGeneration``.

    Requires what :func:`~mmbridge.interop.llava.to_hf_llava` requires plus an ``anyres`` strategy with
    ``newline`` and ``unpad`` on, tiles of the tower's ``image_size`` and a selection that keeps each tile's
    patch grid. LoRA adapters are merged. The result has identical weights and logits and is in eval mode.
    """
    caller = "to_hf_llava_next"
    check_exportable(model, caller)
    strategy = _check_anyres(model, caller)
    _check_tile(model, caller)
    fields = export_fields(model)
    vision = model.vision
    if fields["vision_feature_select_strategy"] == "default" and not vision.has_cls:
        raise ValueError(f"{caller}: select {vision.select!r} on a {vision.model.config.model_type} tower drops a "
                         f"patch of every tile, which LLaVA-NeXT cannot stitch; use select 'default' or 'full'")
    tile = int(vision.model.config.image_size)
    config = LlavaNextConfig(**fields, image_grid_pinpoints=grid_to_pinpoints(strategy.cfg.grid, tile))
    return export_weights(model, lambda: LlavaNextForConditionalGeneration(config), extra_pairs=NEWLINE_PAIR)


def grid_to_pinpoints(grid: list[list[int]], tile: int) -> list[list[int]]:
    """AnyRes ``[rows, cols]`` of tiles → LLaVA-NeXT's ``image_grid_pinpoints`` ((height, width) in pixels)."""
    return [[int(rows) * tile, int(cols) * tile] for rows, cols in grid]


def _check_anyres(model: MultimodalModel, caller: str) -> AnyRes:
    """The model's AnyRes strategy, which must be LLaVA-NeXT's (unpad, a newline per row)."""
    strategy = model.highres
    if not isinstance(strategy, AnyRes):
        what = "none" if strategy is None else repr(model.config.highres.type)
        raise ValueError(f"{caller} needs an 'anyres' high-resolution strategy (ModelConfig.highres={{'type': "
                         f"'anyres'}}), this model has {what}; export a single-crop model with to_hf_llava")
    if not (strategy.cfg.newline and strategy.cfg.unpad):
        raise ValueError(f"{caller}: LLaVA-NeXT always unpads and ends every token row with image_newline; this "
                         f"anyres has newline={strategy.cfg.newline}, unpad={strategy.cfg.unpad}")
    return strategy
