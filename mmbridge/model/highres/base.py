"""The high-resolution contract: one image → crops + a token layout, known before anything is encoded.

A :class:`HighResStrategy` sits between the image and the vision encoder. For an image of
``(height, width)`` it returns an :class:`ImageLayout` — the crops to encode (each with its pixel
size and a tile position), and the token sequence the image occupies in the LLM input: visual slots
(:data:`VISUAL`) and literal separator token ids (LLaVA-UHD's "," and "\\n", Fuyu's row newline).
The layout is a pure function of the image size and the model, so

* the processor asks the model for it per image and expands each ``<image>`` to exactly that
  sequence (the token count depends on each image's size);
* the batch carries only the crops' pixels ``[n_crops, 3, H, W]`` (padded to the batch's largest
  crop) and ``image_sizes`` ``[n_images, 2]`` (original height, width, transformers' name); the model
  recomputes every layout from those sizes;
* the model encodes the crops (grouped by size, and by tile position where the strategy switches
  encoder adapters per position), runs the bridge per crop with that crop's feature grid and lets the
  strategy merge one image's crop tokens into the visual tokens that fill its slots.

What a crop costs and where its tokens lie come from the bridge itself: ``bridge.num_tokens`` and
``bridge.token_grid`` of the encoder's :class:`~mmbridge.model.grid.FeatureGrid` at the crop's size.

Parameters a strategy adds live under the fixed module keys: the ``image_newline`` of AnyRes on the
bridge, Monkey's per-position LoRA inside the vision encoder. :meth:`HighResStrategy.attach` adds them,
as a fusion bridge's ``attach`` does, so save/load rebuild them from the config.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.data.collate import pad_stack
from mmbridge.model.grid import FeatureGrid
from mmbridge.registry import Registry

VISUAL = -1  # a visual slot in an ImageLayout's token sequence
HIGHRES: Registry["HighResStrategy"] = Registry("high-resolution strategy")


@dataclass(frozen=True)
class Crop:
    """One region to encode: its encoder-input ``size`` (height, width) in pixels, the tile ``position`` (0 for a
    global view; 1.. for tiles in reading order) and whether it is the global/overview view."""

    size: tuple[int, int]
    position: int = 0
    overview: bool = False


@dataclass
class ImageLayout:
    """How one image of ``image_size`` (height, width) is encoded and where its tokens go.

    ``crops`` are encoded in order; ``tokens`` is the image's span of the LLM input (``VISUAL`` slots and
    literal token ids); ``grid`` (rows, columns of tiles) and ``extra`` are strategy-specific.
    """

    image_size: tuple[int, int]
    crops: list[Crop]
    tokens: list[int]
    grid: tuple[int, int] = (1, 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visual_tokens(self) -> int:
        return sum(1 for token in self.tokens if token == VISUAL)


class HighResStrategy(abc.ABC):
    """Base class. Subclasses implement :meth:`plan` (the layout), :meth:`crop` (PIL geometry) and may override
    :meth:`merge` (crop tokens → the image's visual tokens; default: concatenation in crop order)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.vision: nn.Module | None = None
        self.bridge: nn.Module | None = None
        self._layouts: dict[tuple[int, int], ImageLayout] = {}

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self, vision: nn.Module, bridge: nn.Module, tokenizer: Any, hidden_size: int) -> None:
        """Bind to the model's encoder, bridge and tokenizer (LLM width ``hidden_size``); subclasses add their
        parameters here."""
        self.vision, self.bridge, self.tokenizer, self.hidden_size = vision, bridge, tokenizer, hidden_size
        self._layouts.clear()

    def export_config(self) -> dict:
        """A dict that rebuilds this strategy (saved in the model config)."""
        import dataclasses

        return dataclasses.asdict(self.cfg)

    # -- layout ---------------------------------------------------------------------------------
    def layout(self, image_size: tuple[int, int]) -> ImageLayout:
        """The layout of an image of ``(height, width)`` (cached per size)."""
        key = (int(image_size[0]), int(image_size[1]))
        if key[0] < 1 or key[1] < 1:
            raise ValueError(f"image size must be positive, got {key} (height, width)")
        if key not in self._layouts:
            self._layouts[key] = self.plan(key)
        return self._layouts[key]

    @abc.abstractmethod
    def plan(self, image_size: tuple[int, int]) -> ImageLayout:
        """The layout of an image of ``(height, width)`` (uncached; :meth:`layout` caches it)."""

    @abc.abstractmethod
    def crop(self, image: Image.Image) -> list[Image.Image]:
        """The PIL crops of ``image``, in :meth:`layout` order and at each crop's size."""

    def typical_tokens(self) -> int:
        """Tokens of an image at twice the encoder's side (for length estimates without opening images)."""
        height, width = self.encoder_size
        return len(self.layout((2 * height, 2 * width)).tokens)

    # -- model side -----------------------------------------------------------------------------
    @property
    def encoder_size(self) -> tuple[int, int]:
        """The encoder's native input (height, width)."""
        return tuple(self.vision.transform.output_size)  # type: ignore[union-attr,return-value]

    def feature_grid(self, size: tuple[int, int]) -> FeatureGrid:
        """The encoder's feature grid for a crop of ``size`` (height, width)."""
        return self.vision.feature_layout(*size)  # type: ignore[union-attr]

    def crop_tokens(self, crop: Crop) -> int:
        """Bridge tokens of one crop."""
        return int(self.bridge.num_tokens(self.feature_grid(crop.size)))  # type: ignore[union-attr]

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the bridge's tokens for a crop of ``size``; a ``ValueError`` naming the bridge when its
        tokens have no place in the image (this strategy lays tokens out in rows)."""
        grid = self.feature_grid(size)
        tokens = self.bridge.token_grid(grid)  # type: ignore[union-attr]
        if tokens is None:
            raise ValueError(f"{type(self).__name__.lower()} lays visual tokens out in rows, but the "
                             f"{type(self.bridge).__name__} bridge's tokens have no place in the image (the encoder "
                             f"gives {grid.describe()}); use a bridge that keeps the grid (mlp, pool, pixel_shuffle) "
                             f"on an encoder whose features are all cells of a grid")
        return tokens

    def encoder_context(self, key: Any) -> Any:
        """A context manager active while crops of :meth:`adapter_key` ``key`` are encoded (Monkey: a tile's LoRA)."""
        import contextlib

        return contextlib.nullcontext()

    def adapter_key(self, crop: Crop) -> Any:
        """Crops with equal keys share one encoder pass (the tile position, where adapters differ per tile)."""
        return None

    def merge(self, layout: ImageLayout, tokens: list[torch.Tensor]) -> torch.Tensor:
        """One image's crop tokens (``[M_c, D]`` per crop) → its visual tokens ``[layout.visual_tokens, D]``."""
        return torch.cat(tokens)

    # -- shared by processor and model -----------------------------------------------------------
    def token_ids(self, image_size: tuple[int, int], image_token_id: int) -> list[int]:
        """The ids one ``<image>`` of ``image_size`` expands to (visual slots as ``image_token_id``)."""
        return [image_token_id if token == VISUAL else token for token in self.layout(image_size).tokens]

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The crops of one image, normalised by the encoder's transform and right/bottom-padded with zeros to the
        largest: ``[n_crops, 3, H, W]``."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        crops = self.crop(image)
        layout = self.layout((image.height, image.width))
        for crop, spec in zip(crops, layout.crops):
            if (crop.height, crop.width) != tuple(spec.size):
                raise AssertionError(f"{type(self).__name__} cut a {crop.height}x{crop.width} crop where its layout "
                                     f"says {spec.size}")
        return pad_stack([self.vision.transform.to_tensor(crop) for crop in crops])  # type: ignore[union-attr]

    def crops_of(self, image_sizes: torch.Tensor) -> list[tuple[int, Crop]]:
        """(image index, crop) for every crop of images of ``image_sizes`` ``[n_images, 2]``, in order."""
        return [(index, crop) for index, size in enumerate(image_sizes.tolist())
                for crop in self.layout(tuple(size)).crops]

    def feature_count(self, crop: Crop) -> int:
        return self.feature_grid(crop.size).count

    def unpad_features(self, features: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Cached per-crop features ``[n_crops, N_max, D_v]`` (right-padded) → ``[N_c, D_v]`` per crop."""
        crops = self.crops_of(image_sizes)
        if len(crops) != features.shape[0]:
            raise ValueError(f"images of sizes {image_sizes.tolist()} have {len(crops)} crops but {features.shape[0]} "
                             f"rows of cached features were given")
        return [row[:self.feature_count(crop)] for row, (_, crop) in zip(features, crops)]


def crop_features(strategy: HighResStrategy, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                  encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Crops ``[n_crops, 3, H, W]`` (padded) of images of ``image_sizes`` ``[n_images, 2]`` → the encoder's
    features ``[N_c, D_v]`` per crop, in crop order. ``encode`` is the vision encoder."""
    crops = strategy.crops_of(image_sizes)
    if len(crops) != pixel_values.shape[0]:
        raise ValueError(f"the layouts of {len(image_sizes)} image(s) of sizes {image_sizes.tolist()} (height, width) "
                         f"need {len(crops)} crops but pixel_values holds {pixel_values.shape[0]}")
    return encode_crops(strategy, pixel_values, [crop for _, crop in crops], encode)


def tokens_from_features(strategy: HighResStrategy, features: list[torch.Tensor], image_sizes: torch.Tensor,
                         bridge: Callable[..., torch.Tensor], inputs: BridgeInputs | None) -> torch.Tensor:
    """Per-crop features → bridge per crop → each image's crops merged: visual tokens ``[sum of slots, D]`` in image
    order. Each crop's row of the per-image ``inputs`` is its image's."""
    crops = strategy.crops_of(image_sizes)
    tokens = bridge_crops(features, [index for index, _ in crops], bridge, inputs,
                          [strategy.feature_grid(crop.size) for _, crop in crops])
    merged, cursor = [], 0
    for size in image_sizes.tolist():
        layout = strategy.layout(tuple(size))
        count = len(layout.crops)
        image_tokens = strategy.merge(layout, tokens[cursor:cursor + count])  # [visual slots, D]
        if image_tokens.shape[0] != layout.visual_tokens:
            raise ValueError(f"{type(strategy).__name__} merged {image_tokens.shape[0]} visual tokens for an image "
                             f"of {layout.image_size} but its layout has {layout.visual_tokens} slots")
        merged.append(image_tokens)
        cursor += count
    return torch.cat(merged)  # [sum of slots, D]


def encode_crops(strategy: HighResStrategy, pixel_values: torch.Tensor, crops: list[Crop],
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Vision features ``[N_c, D_v]`` per crop; crops sharing a size and adapter key go through one pass."""
    groups: dict[tuple, list[int]] = {}
    for index, crop in enumerate(crops):
        groups.setdefault((crop.size, strategy.adapter_key(crop)), []).append(index)
    features: list[torch.Tensor | None] = [None] * len(crops)
    for (size, key), members in groups.items():
        height, width = size
        pixels = pixel_values[members, :, :height, :width]  # [n, 3, h, w]: the padding cut away
        with strategy.encoder_context(key):
            encoded = encode(pixels)  # [n, N, D_v]
        for row, index in enumerate(members):
            features[index] = encoded[row]
    return features  # type: ignore[return-value]


def bridge_crops(features: list[torch.Tensor], owners: list[int], bridge: Callable[..., torch.Tensor],
                 inputs: BridgeInputs | None, grids: list[FeatureGrid]) -> list[torch.Tensor]:
    """Bridge tokens ``[M_c, D]`` per crop; crops with the same feature grid go through one call, each with its
    image's (``owners``) row of the per-image ``inputs``."""
    groups: dict[FeatureGrid, list[int]] = {}
    for index, grid in enumerate(grids):
        groups.setdefault(grid, []).append(index)
    tokens: list[torch.Tensor | None] = [None] * len(features)
    for grid, members in groups.items():
        rows = torch.tensor([owners[index] for index in members], dtype=torch.long)
        bridged = bridge(torch.stack([features[index] for index in members]), grid,
                         inputs.rows(rows) if inputs is not None else None)  # [n, M, D]
        for row, index in enumerate(members):
            tokens[index] = bridged[row]
    return tokens  # type: ignore[return-value]


def select_best_resolution(image_size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (height, width) that keeps the most of the image's pixels when it is scaled to fit, wasting
    the fewest on ties — LLaVA-NeXT's rule (Liu et al. 2024, "LLaVA-NeXT: improved reasoning, OCR and world
    knowledge"; transformers' ``select_best_resolution``)."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_height, cand_width in candidates:
        scale = min(cand_width / width, cand_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_width * cand_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_height, cand_width), effective, wasted
    return best  # type: ignore[return-value]


def fit_within(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of ``image_size`` scaled to fit ``target`` with its aspect ratio kept (the longer relative
    side fills the target; the other rounds up, capped), as LLaVA-NeXT resizes before padding."""
    height, width = image_size
    target_height, target_width = target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def split_grid(image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """``image`` cut into ``rows × cols`` equal tiles, in reading order (its sides must divide evenly)."""
    width, height = image.size
    tile_width, tile_height = width // cols, height // rows
    return [image.crop((col * tile_width, row * tile_height, (col + 1) * tile_width, (row + 1) * tile_height))
            for row in range(rows) for col in range(cols)]


def single_token_id(tokenizer: Any, text: str, what: str) -> int:
    """The id ``text`` encodes to, which must be one token (separators, newlines)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} must be one token of the LLM's tokenizer, but it encodes to {ids}")
    return int(ids[0])


def build_highres(spec: Any) -> HighResStrategy:
    """Build a strategy from a dict (``{"type": "anyres", ...}``) or a registered config."""
    return HIGHRES.build(spec)
