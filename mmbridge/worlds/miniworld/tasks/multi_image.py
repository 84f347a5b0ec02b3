"""Questions over 2–4 interleaved images: which image has an object, the most objects, a colour, equal counts.

The prompt names the images in order ("Image 1: <image>" …); answers name images as
``"Image k"`` (accepting ``"k"``, ``"image k"``, ``"the second image"``, ``"second"``).
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.language import ordinal, refer
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.scene import Scene, filler_pairs, layout_scene, object_specs
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.vocabulary import Pair

FOCUS_KINDS = ("contains", "colour")  # kinds that ask about a colour–shape object (usable when compositional)
ALL_KINDS = FOCUS_KINDS + ("most", "same_count")


def image_answers(position: int) -> list[str]:
    """Accepted names of image ``position`` (1-based)."""
    return [f"Image {position}", str(position), f"image {position}", f"the {ordinal(position)} image",
            ordinal(position)]


def _scenes(world: World, counts: list[int], focus: Pair | None, focus_image: int | None) -> list[Scene]:
    """One scene per count; image ``focus_image`` (0-based) holds ``focus`` first, no other image holds it."""
    scenes = []
    for position, count in enumerate(counts):
        exclude = [focus] if focus else []
        pairs = filler_pairs(world, count, exclude=exclude)
        if position == focus_image:
            pairs = [focus] + pairs[1:]
        scenes.append(layout_scene(world, object_specs(world, pairs)))
    return scenes


def build_multi_image(world: World) -> Episode | None:
    """2–4 scenes of 1–4 objects and one question across them."""
    images = world.integer(2, 4)
    kind = world.choice(FOCUS_KINDS if world.compositional else ALL_KINDS)
    if kind in FOCUS_KINDS:
        focus, chosen = world.focus_pair(), world.integer(0, images - 1)
        scenes = _scenes(world, [world.integer(1, 3) for _ in range(images)], focus, chosen)
        question = _contains(scenes, chosen) if kind == "contains" else _colour(world, scenes, chosen)
    elif kind == "most":
        counts = [world.integer(1, 4) for _ in range(images)]
        scenes = _scenes(world, counts, None, None)
        question = _most(scenes)
    else:
        counts = [world.integer(1, 4) for _ in range(images)]
        compared = sorted(world.sample(range(images), 2))
        if world.chance(0.5):
            counts[compared[1]] = counts[compared[0]]
        scenes = _scenes(world, counts, None, None)
        question = _same_count(scenes, compared)
    return Episode(scenes, [question], layout="multi") if question else None


def _contains(scenes: list[Scene], chosen: int) -> Question:
    """"Which image contains a red circle?" (exactly one does)."""
    colour, shape = scenes[chosen].objects[0].pair
    return Question(f"Which image contains a {colour} {shape}?", "short", f"Image {chosen + 1}",
                    image_answers(chosen + 1))


def _colour(world: World, scenes: list[Scene], chosen: int) -> Question | None:
    """"What colour is the circle in image 2?"."""
    focus = scenes[chosen].objects[0]
    name = refer(world, focus, scenes[chosen].objects, exclude=("colour",))
    if name is None:
        return None
    return Question(f"What colour is the {name} in image {chosen + 1}?", "short", focus.colour, [focus.colour])


def _most(scenes: list[Scene]) -> Question | None:
    """"Which image has the most objects?" when one image has strictly the most."""
    counts = [len(scene.objects) for scene in scenes]
    if counts.count(max(counts)) > 1:
        return None
    position = counts.index(max(counts)) + 1
    return Question("Which image has the most objects?", "short", f"Image {position}", image_answers(position))


def _same_count(scenes: list[Scene], compared: list[int]) -> Question:
    """"Do image 1 and image 3 show the same number of objects?" (``compared``: two 0-based positions)."""
    first, second = compared
    answer = "yes" if len(scenes[first].objects) == len(scenes[second].objects) else "no"
    return Question(f"Do image {first + 1} and image {second + 1} show the same number of objects?", "yesno",
                    answer, [answer])


TASKS = [Task("multi_image", "questions across 2-4 interleaved images", build_multi_image)]
