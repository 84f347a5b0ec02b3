"""Scene edits for the ``image_edit`` task: one instruction, one change, everything else kept.

Each edit takes a scene laid out for generation (:func:`~mmbridge.worlds.miniworld.generation.layout_in_regions`)
and returns the instruction and the edited scene, or ``None`` when the scene does not allow it (the task then
draws another scene). The kinds (:data:`EDIT_KINDS`):

- ``colour``: "The same scene with the circle in blue." — one object takes another colour;
- ``shape``: "The same scene with the red circle as a star." — one object takes another shape (same place, extent);
- ``size``: "The same scene with the circle made large." — one object switches size class (same centre);
- ``remove``: "The same scene without the square." — one object goes;
- ``add``: "The same scene with one more small red triangle at the bottom." — a copy of one object (colour, shape
  and size, all named) appears in the named ninth;
- ``move``: "The same scene with the circle moved to the top left." — one object moves to a free ninth.

Objects to change are named as the questions name them (:func:`~mmbridge.worlds.miniworld.language.refer`: a
phrase that matches exactly one object). The edited colour–shape pair comes from the split's pairs: seen pairs in
train/val/test; in the compositional split, colour and shape edits that make a held-out pair.
"""

from __future__ import annotations

import copy

from mmbridge.worlds.miniworld.generation import fits, place, region_index, region_of
from mmbridge.worlds.miniworld.language import noun_phrase, refer, region_phrase
from mmbridge.worlds.miniworld.scene import STANDARD_SCALE, ObjectSpec, Scene, SceneObject, jittered
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import COLOURS, SHAPES, SIZES

EDIT_KINDS = ("colour", "shape", "size", "remove", "add", "move")
COMPOSITIONAL_KINDS = ("colour", "shape")  # the edits that can make a held-out pair
TEMPLATES = {
    "colour": ("The same scene with the {name} in {value}.", "Make the {name} {value}.",
               "Change the colour of the {name} to {value}."),
    "shape": ("The same scene with the {name} as a {value}.", "Turn the {name} into a {value}."),
    "size": ("The same scene with the {name} made {value}.", "Make the {name} {value}."),
    "remove": ("The same scene without the {name}.", "Remove the {name}."),
    "add": ("The same scene with one more {name} {value}.", "Add another {name} {value}."),
    "move": ("The same scene with the {name} moved {value}.", "Move the {name} {value}."),
}
OBJECT_COUNTS = {"remove": (2, 3), "add": (1, 2)}  # objects in the input scene, per kind (others: 1-3)


def edit_scene(world: World, scene: Scene, kind: str) -> tuple[str, Scene] | None:
    """``(instruction, edited scene)`` for an edit of ``kind`` on ``scene`` (left unchanged), or ``None``."""
    target = world.choice(scene.objects)
    # the object to change is named as questions name it; the one to copy in full ("another small red circle")
    name = noun_phrase(target) if kind == "add" else refer(world, target, scene.objects)
    if name is None:
        return None
    edited = copy.deepcopy(scene)
    position = scene.objects.index(target)
    change = {"colour": _recolour, "shape": _reshape, "size": _resize, "remove": _remove, "add": _add,
              "move": _move}[kind]
    value = change(world, edited, position)
    if value is None:
        return None
    return world.choice(TEMPLATES[kind]).format(name=name, value=value), edited


def _pair_allowed(world: World, colour: str, shape: str) -> bool:
    """Whether an edit may make the pair: one of the split's pairs (held-out ones in the compositional split)."""
    return (colour, shape) in world.focus_pairs


def _recolour(world: World, scene: Scene, position: int) -> str | None:
    """Give object ``position`` another colour; returns the colour."""
    item = scene.objects[position]
    colours = [colour for colour in COLOURS if colour != item.colour and _pair_allowed(world, colour, item.shape)]
    if not colours:
        return None
    item.colour = world.choice(colours)
    item.rgb = jittered(world, item.colour)
    return item.colour


def _reshape(world: World, scene: Scene, position: int) -> str | None:
    """Give object ``position`` another shape at the same place and extent; returns the shape."""
    item = scene.objects[position]
    shapes = [shape for shape in SHAPES if shape != item.shape and _pair_allowed(world, item.colour, shape)]
    if not shapes:
        return None
    item.shape = world.choice(shapes)
    return item.shape if fits(scene, item, _others(scene, position)) else None


def _resize(world: World, scene: Scene, position: int) -> str | None:
    """Switch object ``position`` to the other size class around the same centre; returns the new size."""
    item = scene.objects[position]
    item.size = SIZES[1 - SIZES.index(item.size)]
    item.extent = max(5, round(world.uniform(*STANDARD_SCALE.extent_range(item.size)) * min(scene.width,
                                                                                            scene.height)))
    return item.size if fits(scene, item, _others(scene, position)) else None


def _remove(world: World, scene: Scene, position: int) -> str | None:
    """Take object ``position`` away (a scene keeps at least one object); returns ``""``."""
    if len(scene.objects) < 2:
        return None
    del scene.objects[position]
    return ""


def _add(world: World, scene: Scene, position: int) -> str | None:
    """Add a copy of object ``position`` in a free ninth; returns where (``"at the bottom"``)."""
    source = scene.objects[position]
    region = _free_region(world, scene)
    added = None if region is None else place(world, scene, ObjectSpec(source.colour, source.shape, source.size),
                                              region, scene.objects)
    if added is None:
        return None
    added.rgb = source.rgb  # "one more" of the same object: the very same colour
    scene.objects.append(added)
    return region_phrase(region_of(region))


def _move(world: World, scene: Scene, position: int) -> str | None:
    """Move object ``position`` (same extent and colour) to a free ninth; returns where (``"to the top left"``)."""
    item = scene.objects[position]
    region = _free_region(world, scene)
    others = _others(scene, position)
    moved = None if region is None else place(world, scene, ObjectSpec(item.colour, item.shape, item.size), region,
                                              others, item.extent)
    if moved is None:
        return None
    moved.rgb = item.rgb
    scene.objects[position] = moved
    return f"to the {region_of(region)}"


def _free_region(world: World, scene: Scene) -> int | None:
    """A ninth of the canvas that holds no object's centre, or ``None``."""
    taken = {region_index(item, scene.width, scene.height) for item in scene.objects}
    free = [region for region in range(9) if region not in taken]
    return world.choice(free) if free else None


def _others(scene: Scene, position: int) -> list[SceneObject]:
    return [item for number, item in enumerate(scene.objects) if number != position]
