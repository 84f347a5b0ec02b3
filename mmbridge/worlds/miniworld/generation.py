"""The output side of MiniWorld: scenes a model is asked to draw, their captions, and their images.

Generation tasks (:mod:`.tasks.generation`) end the assistant's reply with :data:`OUTPUT_MARKER` (``<image_out>``,
which the model side expands into its signal tokens) and give each marker an :class:`Output`: the scene to draw,
the one-sentence caption a generator is conditioned on, and which attributes the request asked for (what
:func:`~mmbridge.worlds.miniworld.scoring.score_image` checks). In a record they are the ``outputs`` field::

    {"modality": "image", "caption": "A large red circle in the top left.", "image": "images/ID-out1.png",
     "scene": {...}, "asked": ["count", "colour", "shape", "size", "position"]}

Scenes drawn for generation keep their objects further apart than other tasks (:data:`GENERATION_GAP`) and put
each object in its own ninth of the canvas, its centre :data:`REGION_MARGIN` from the ninth's edges, so a small
blurry generated image still shows separate objects in unambiguous places.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from mmbridge.data.formats.llava import OUTPUT_MARKERS
from mmbridge.worlds.miniworld.geometry import REGIONS, boxes_apart
from mmbridge.worlds.miniworld.language import article, grouped_phrases, join_list, noun_phrase, region_phrase
from mmbridge.worlds.miniworld.render import render_image
from mmbridge.worlds.miniworld.scene import (CANVAS, MAX_LAYOUT_ATTEMPTS, PLACEMENT_TRIES, STANDARD_SCALE,
                                             Background, LayoutError, ObjectSpec, Scene, SceneObject, jittered)
from mmbridge.worlds.miniworld.splits import World

OUTPUT_MARKER = OUTPUT_MARKERS["image"]
ATTRIBUTES = ("count", "colour", "shape", "size", "position")  # what a request can ask for, in scoring order
GENERATION_GAP = 0.07  # share of the side between two objects' boxes (16 px at 224: 2 px still at 32)
REGION_MARGIN = 0.04  # share of the side between an object's centre and the edges of its ninth (9 px at 224)
PLAIN_WHITE = Background("plain", "white")  # the background of a text-to-image target (requests name none)


@dataclass
class Output:
    """One image the assistant answers with: the ``scene`` to draw, its ``caption``, the ``asked`` attributes."""

    scene: Scene
    caption: str
    asked: tuple[str, ...] = ATTRIBUTES

    def to_record(self, image: str | None) -> dict:
        """The record's ``outputs`` entry, ``image`` being the target's path (or ``None``: draw the scene)."""
        return {"modality": "image", "caption": self.caption, "image": image, "scene": self.scene.to_dict(),
                "asked": list(self.asked)}


def region_index(item: SceneObject, width: int, height: int) -> int:
    """Which ninth of the canvas ``item``'s centre lies in, 0 (top left) … 8 (bottom right), row by row."""
    return min(2, 3 * item.y // height) * 3 + min(2, 3 * item.x // width)


def region_of(index: int) -> str:
    """The name of ninth ``index``: ``"top left"``, ``"center"``, …"""
    return REGIONS[index // 3][index % 3]


def fits(scene: Scene, item: SceneObject, others: list[SceneObject]) -> bool:
    """Whether ``item`` lies on the canvas with a gap to its edges, apart from ``others``, its centre well inside
    its ninth (at least :data:`REGION_MARGIN` from the ninth's edges)."""
    side = min(scene.width, scene.height)
    gap, margin = round(GENERATION_GAP * side), REGION_MARGIN * side
    x0, y0, x1, y1 = item.box
    if x0 < gap or y0 < gap or x1 > scene.width - 1 - gap or y1 > scene.height - 1 - gap:
        return False
    for centre, length in ((item.x, scene.width), (item.y, scene.height)):
        offset = centre % (length / 3)
        if offset < margin or offset > length / 3 - margin:
            return False
    return all(boxes_apart(item.box, other.box, gap) for other in others)


def place(world: World, scene: Scene, spec: ObjectSpec, region: int, others: list[SceneObject],
          extent: int | None = None) -> SceneObject | None:
    """A new object of ``spec`` (``extent`` pixels, or drawn for its size class) with its centre in ninth ``region``
    that :func:`fits`, or ``None``."""
    side = min(scene.width, scene.height)
    extent = extent or max(5, round(world.uniform(*STANDARD_SCALE.extent_range(spec.size)) * side))
    rgb = jittered(world, spec.colour)
    row, column = divmod(region, 3)
    margin = REGION_MARGIN * side
    for _ in range(PLACEMENT_TRIES):
        x = world.integer(round(column * scene.width / 3 + margin), round((column + 1) * scene.width / 3 - margin))
        y = world.integer(round(row * scene.height / 3 + margin), round((row + 1) * scene.height / 3 - margin))
        item = SceneObject(spec.shape, spec.colour, spec.size, x, y, extent, rgb)
        if fits(scene, item, others):
            return item
    return None


def layout_in_regions(world: World, specs: list[ObjectSpec], regions: list[int], background: Background,
                      width: int = CANVAS, height: int = CANVAS) -> Scene:
    """``specs[i]`` placed in ninth ``regions[i]`` (distinct ninths); :class:`LayoutError` when they do not fit."""
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        scene = Scene(width, height, background)
        for spec, region in zip(specs, regions):
            item = place(world, scene, spec, region, scene.objects)
            if item is None:
                break
            scene.objects.append(item)
        else:
            return scene
    raise LayoutError(f"cannot fit {len(specs)} objects in ninths {regions} of a {width}x{height} canvas")


def object_phrases(scene: Scene, with_size: bool, with_position: bool) -> list[str]:
    """The objects as phrases: one per object with its place (top to bottom, left to right), or grouped by
    description without places (``"two small red circles"``, left to right)."""
    if not with_position:
        return grouped_phrases(scene.objects, with_size=with_size)
    attributes = ("size", "colour", "shape") if with_size else ("colour", "shape")
    ordered = sorted(scene.objects, key=lambda item: region_index(item, scene.width, scene.height))
    return [f"{article(noun_phrase(item, attributes))} "
            f"{region_phrase(region_of(region_index(item, scene.width, scene.height)))}" for item in ordered]


def as_sentence(text: str) -> str:
    """Capitalised, ending with a full stop."""
    return text[:1].upper() + text[1:] + "."


def scene_caption(scene: Scene, asked: tuple[str, ...] = ATTRIBUTES, with_background: bool = False) -> str:
    """The scene in one sentence, naming what ``asked`` holds: ``"A large red circle in the top left and a small
    blue square at the bottom."`` (``, on a plain beige background`` with the background)."""
    objects = join_list(object_phrases(scene, "size" in asked, "position" in asked))
    return as_sentence(f"{objects}, on {scene.background.describe()}" if with_background else objects)


def output_images(outputs: list[dict]) -> list[Image.Image]:
    """The target image of each ``outputs`` entry: its file when ``image`` names one, else its ``scene`` drawn.

    ``outputs`` is a record's field or a :class:`~mmbridge.data.Sample`'s ``outputs`` (streamed MiniWorld
    samples name no file: their targets are drawn from the scene, the same pixels as the written PNG).
    """
    images = []
    for number, output in enumerate(outputs):
        if output.get("image"):
            with Image.open(output["image"]) as image:
                images.append(image.convert("RGB"))
        elif output.get("scene"):
            images.append(draw_output(output))
        else:
            raise ValueError(f"outputs[{number}] has neither an 'image' path nor a 'scene' to draw")
    return images


def draw_output(output: dict) -> Image.Image:
    """The target image of one ``outputs`` entry, drawn from its ``scene`` (the pixels the written PNG holds)."""
    return render_image(Scene.from_dict(output["scene"]))
