"""Scenes: the symbolic description every image is drawn from, and their random layout.

A :class:`Scene` holds the canvas size, a :class:`Background`, shaped objects
(:class:`SceneObject`: shape, colour, size class, centre, extent, exact RGB) and
rendered words or numbers (:class:`TextItem`). Objects and text never overlap (boxes
keep a gap), so every object is one connected blob of its colour. ``Scene.to_dict``
is the JSON-able description stored with each sample; ``Scene.from_dict`` reads it back (the same
scene, drawn to the same pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mmbridge.worlds.miniworld.fonts import random_text_font, text_box
from mmbridge.worlds.miniworld.geometry import (Box, boxes_apart, normalised_box, outline_box, region_name,
                                                shape_outline)
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import (BACKGROUNDS, COLOUR_JITTER, COLOURS, DARK_TEXT_COLOURS, RGB,
                                                  WORDS, Pair)

CANVAS = 224
MAX_LAYOUT_ATTEMPTS = 60
PLACEMENT_TRIES = 80
BACKGROUND_KINDS = ("plain", "gradient", "dots", "stripes")


@dataclass(frozen=True)
class SizeScale:
    """Object extents per size class, as fractions of the canvas's shorter side."""

    small: tuple[float, float]
    large: tuple[float, float]

    def extent_range(self, size: str) -> tuple[float, float]:
        return self.small if size == "small" else self.large


STANDARD_SCALE = SizeScale(small=(0.17, 0.21), large=(0.30, 0.38))  # 38–47 px and 67–85 px at 224
TINY_SCALE = SizeScale(small=(0.016, 0.021), large=(0.024, 0.0295))  # at most 3% of the side


@dataclass(frozen=True)
class ObjectSpec:
    """What to place: a colour, a shape and a size class."""

    colour: str
    shape: str
    size: str

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


@dataclass
class SceneObject:
    """A filled shape centred at ``(x, y)`` inside an ``extent``-pixel square, drawn in ``rgb``."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    extent: int
    rgb: RGB

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def outline(self) -> list[tuple[int, int]]:
        return shape_outline(self.shape, self.x, self.y, self.extent)

    @property
    def box(self) -> Box:
        """Pixel box of the drawn shape, ends included."""
        return outline_box(self.outline)

    def to_dict(self, width: int, height: int) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y,
                "extent": self.extent, "rgb": list(self.rgb), "box": self.box,
                "box_999": normalised_box(self.box, width, height),
                "region": region_name(self.x, self.y, width, height)}


@dataclass(frozen=True)
class TextSpec:
    """Text to place: the string, whether it is a word or a number, its font, pixel size and colour."""

    text: str
    kind: str
    font: str
    font_size: int
    colour: str
    rgb: RGB


@dataclass
class TextItem:
    """Text drawn with its top-left anchor at ``(x, y)``."""

    spec: TextSpec
    x: int
    y: int

    @property
    def text(self) -> str:
        return self.spec.text

    @property
    def box(self) -> Box:
        return text_box(self.spec.text, self.spec.font, self.spec.font_size, self.x, self.y)

    def to_dict(self, width: int, height: int) -> dict:
        centre_x, centre_y = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return {"text": self.spec.text, "kind": self.spec.kind, "font": self.spec.font,
                "font_size": self.spec.font_size, "colour": self.spec.colour, "rgb": list(self.spec.rgb),
                "x": self.x, "y": self.y, "box": self.box, "region": region_name(centre_x, centre_y, width, height)}


@dataclass
class Background:
    """A light canvas: plain, a two-colour gradient, or faint dots or stripes (``pattern_seed`` places them)."""

    kind: str
    colour: str
    second_colour: str | None = None
    direction: str | None = None
    pattern_seed: int | None = None
    spacing: int | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Background:
        """The background that :meth:`to_dict` wrote."""
        return cls(**data)

    def describe(self) -> str:
        """Words for captions: "a plain beige background", "a gradient from white to light blue", …"""
        if self.kind == "gradient":
            return f"a gradient background from {self.colour} to {self.second_colour}"
        if self.kind == "dots":
            return f"a {self.colour} background with faint dots"
        if self.kind == "stripes":
            return f"a {self.colour} background with faint {self.direction} stripes"
        return f"a plain {self.colour} background"


@dataclass
class Scene:
    """One image's full symbolic description."""

    width: int
    height: int
    background: Background
    objects: list[SceneObject] = field(default_factory=list)
    texts: list[TextItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "background": self.background.to_dict(),
                "objects": [item.to_dict(self.width, self.height) for item in self.objects],
                "texts": [item.to_dict(self.width, self.height) for item in self.texts]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """The scene that :meth:`to_dict` wrote (derived fields such as ``box`` and ``region`` are recomputed)."""
        objects = [SceneObject(item["shape"], item["colour"], item["size"], item["x"], item["y"], item["extent"],
                               tuple(item["rgb"])) for item in data.get("objects", [])]
        texts = [TextItem(TextSpec(item["text"], item["kind"], item["font"], item["font_size"], item["colour"],
                                   tuple(item["rgb"])), item["x"], item["y"]) for item in data.get("texts", [])]
        return cls(data["width"], data["height"], Background.from_dict(data["background"]), objects, texts)


class LayoutError(RuntimeError):
    """The requested objects and text do not fit on the canvas."""


def random_background(world: World) -> Background:
    """A random light background of one of :data:`BACKGROUND_KINDS`."""
    kind = world.choice(BACKGROUND_KINDS)
    colour = world.choice(list(BACKGROUNDS))
    if kind == "gradient":
        second = world.choice([name for name in BACKGROUNDS if name != colour])
        return Background(kind, colour, second, direction=world.choice(("vertical", "horizontal")))
    if kind == "dots":
        return Background(kind, colour, pattern_seed=world.integer(0, 2**31 - 1), spacing=world.integer(14, 30))
    if kind == "stripes":
        return Background(kind, colour, direction=world.choice(("vertical", "horizontal")),
                          spacing=world.integer(10, 24))
    return Background(kind, colour)


def jittered(world: World, colour: str) -> RGB:
    """The palette colour of ``colour`` with each channel moved by at most :data:`COLOUR_JITTER`."""
    red, green, blue = (max(0, min(255, channel + world.integer(-COLOUR_JITTER, COLOUR_JITTER)))
                        for channel in COLOURS[colour])
    return (red, green, blue)


def object_specs(world: World, pairs: list[Pair], sizes: list[str] | None = None) -> list[ObjectSpec]:
    """Specs for ``pairs`` with the given sizes, or sizes from :meth:`World.sizes`."""
    sizes = sizes if sizes is not None else world.sizes(len(pairs))
    return [ObjectSpec(colour, shape, size) for (colour, shape), size in zip(pairs, sizes)]


def filler_pairs(world: World, count: int, exclude: Sequence[Pair] = ()) -> list[Pair]:
    """``count`` seen pairs for objects nobody asks about, avoiding ``exclude``."""
    return [world.pair(exclude=list(exclude)) for _ in range(count)]


def distractor_text(world: World, sizes: tuple[int, int] = (11, 18)) -> TextSpec:
    """A dark word or number in a random font, for scenes that are not about reading."""
    colour = world.choice(list(DARK_TEXT_COLOURS))
    text, kind = random_string(world)
    font, size = random_text_font(world, world.integer(*sizes))
    return TextSpec(text, kind, font, size, colour, DARK_TEXT_COLOURS[colour])


def random_string(world: World) -> tuple[str, str]:
    """``(text, kind)``: a word from :data:`WORDS` or a 1–4 digit number."""
    if world.chance(0.35):
        return str(world.integer(0, 10 ** world.integer(1, 4) - 1)), "number"
    return world.choice(WORDS), "word"


def layout_scene(world: World, specs: list[ObjectSpec], texts: list[TextSpec] = (), width: int = CANVAS,
                 height: int = CANVAS, scale: SizeScale = STANDARD_SCALE,
                 background: Background | None = None) -> Scene:
    """Place ``specs`` (in order: ``scene.objects[i]`` is ``specs[i]``) and ``texts`` without overlap.

    Raises :class:`LayoutError` when no layout is found.
    """
    background = background or random_background(world)
    gap = max(3, round(0.02 * min(width, height)))
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        objects = _place_objects(world, specs, width, height, scale, gap)
        placed_texts = _place_texts(world, texts, objects, width, height, gap) if objects is not None else None
        if objects is not None and placed_texts is not None:
            return Scene(width, height, background, objects, placed_texts)
    raise LayoutError(f"cannot fit {len(specs)} objects and {len(texts)} texts on a {width}x{height} canvas")


def _place_objects(world: World, specs: list[ObjectSpec], width: int, height: int, scale: SizeScale,
                   gap: int) -> list[SceneObject] | None:
    """Random non-overlapping positions for every spec, or ``None`` if one does not fit."""
    side = min(width, height)
    objects: list[SceneObject] = []
    for spec in specs:
        extent = max(5, round(world.uniform(*scale.extent_range(spec.size)) * side))
        rgb = jittered(world, spec.colour)
        for _ in range(PLACEMENT_TRIES):
            candidate = SceneObject(spec.shape, spec.colour, spec.size, 0, 0, extent, rgb)
            candidate.x = world.integer(gap + extent // 2, width - gap - extent + extent // 2)
            candidate.y = world.integer(gap + extent // 2, height - gap - extent + extent // 2)
            if all(boxes_apart(candidate.box, other.box, gap) for other in objects):
                objects.append(candidate)
                break
        else:
            return None
    return objects


def _place_texts(world: World, specs: list[TextSpec], objects: list[SceneObject], width: int, height: int,
                 gap: int) -> list[TextItem] | None:
    """Random positions for the texts, clear of objects and of each other, or ``None``."""
    taken = [item.box for item in objects]
    items: list[TextItem] = []
    for spec in specs:
        probe = TextItem(spec, 0, 0).box
        text_width, text_height = probe[2] - probe[0] + 1, probe[3] - probe[1] + 1
        if text_width + 2 * gap > width or text_height + 2 * gap > height:
            return None
        for _ in range(PLACEMENT_TRIES):
            item = TextItem(spec, world.integer(gap, width - gap - text_width) - probe[0],
                            world.integer(gap, height - gap - text_height) - probe[1])
            if all(boxes_apart(item.box, box, gap) for box in taken):
                items.append(item)
                taken.append(item.box)
                break
        else:
            return None
    return items
