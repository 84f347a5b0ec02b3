"""Generation requests: the assistant answers with an image (NExT-GPT's any-to-any output).

``text_to_image``: "Draw a large red circle and a small blue square." — 1–3 objects with their colours and shapes,
often their sizes, sometimes their places (``in the top left``, ``at the bottom``…, the world's ninths), on a plain
white canvas. ``image_edit``: an image and "The same scene with the circle in blue." (:mod:`..edits`; sample ``i``
makes the edit ``EDIT_KINDS[i % 6]``, so any multiple of 6 samples is balanced). The reply is a
short sentence ending with the output marker ``<image_out>``; the episode's :class:`~..generation.Output` holds the
scene to draw, its one-sentence caption (what a generator is conditioned on) and the attributes asked. In the
compositional split the first requested object (text-to-image) or the edited object is a held-out pair.
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.edits import COMPOSITIONAL_KINDS, EDIT_KINDS, OBJECT_COUNTS, edit_scene
from mmbridge.worlds.miniworld.generation import (ATTRIBUTES, OUTPUT_MARKER, PLAIN_WHITE, Output, layout_in_regions,
                                                  object_phrases, scene_caption)
from mmbridge.worlds.miniworld.language import join_list
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.scene import ObjectSpec, Scene, filler_pairs, random_background
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task

REQUESTS = ("Draw {}.", "Generate an image of {}.", "Make a picture with {}.", "Can you draw {}?", "Show me {}.",
            "Create an image showing {}.")
DRAW_REPLIES = ("Here is the image: {}", "Sure, here it is. {}", "Here you go: {}")
EDIT_REPLIES = ("Here is the edited image: {}", "Sure, here is the new scene. {}", "Done: {}")
SIZE_CHANCE = 0.7  # a request names the sizes
POSITION_CHANCE = 0.5  # a request names the places
REPEAT_CHANCE = 0.3  # an object repeats the one before it ("two small red circles")


def image_format_question(text: str, reply: str) -> Question:
    """The request as a question of format ``image``: the answer is the reply with its output marker."""
    return Question(text, "image", reply, [reply])


def request_specs(world: World) -> list[ObjectSpec]:
    """1–3 objects to draw: a focus pair (held out in the compositional split), then seen pairs or repeats."""
    count = world.integer(1, 3)
    focus = world.focus_pair()
    pairs = [focus] + filler_pairs(world, count - 1, exclude=[focus])
    sizes = world.sizes(count)
    specs = [ObjectSpec(colour, shape, size) for (colour, shape), size in zip(pairs, sizes)]
    for position in range(1, count):
        if world.chance(REPEAT_CHANCE) and not world.compositional:
            specs[position] = specs[position - 1]
    return specs


def build_text_to_image(world: World) -> Episode:
    """"Draw …" for 1–3 objects on a plain white canvas; the output is that scene."""
    specs = request_specs(world)
    scene = layout_in_regions(world, specs, world.sample(range(9), len(specs)), PLAIN_WHITE)
    asked = tuple(name for name in ATTRIBUTES if name not in ("size", "position")
                  or world.chance(SIZE_CHANCE if name == "size" else POSITION_CHANCE))
    objects = join_list(object_phrases(scene, "size" in asked, "position" in asked))
    request = world.choice(REQUESTS).format(objects)
    reply = world.choice(DRAW_REPLIES).format(OUTPUT_MARKER)
    return Episode([], [image_format_question(request, reply)], layout="text",
                   outputs=[Output(scene, scene_caption(scene, asked), asked)])


def build_image_edit(world: World) -> Episode | None:
    """An image of 1–3 objects and one edit instruction; the output is the edited scene, every attribute asked."""
    kinds = COMPOSITIONAL_KINDS if world.compositional else EDIT_KINDS
    kind = kinds[world.index % len(kinds)]  # sample i makes edit i mod 6 (mod 2 when compositional): balanced
    low, high = OBJECT_COUNTS.get(kind, (1, 3))
    count = world.integer(low, high)
    pairs = filler_pairs(world, count)  # seen pairs: in the compositional split the edit makes the held-out one
    specs = [ObjectSpec(colour, shape, size) for (colour, shape), size in zip(pairs, world.sizes(count))]
    scene = layout_in_regions(world, specs, world.sample(range(9), count), random_background(world))
    edit = edit_scene(world, scene, kind)
    if edit is None:
        return None
    instruction, edited = edit
    reply = world.choice(EDIT_REPLIES).format(OUTPUT_MARKER)
    return Episode([scene], [image_format_question(instruction, reply)], edit=kind,
                   outputs=[Output(edited, edit_caption(edited))])


def edit_caption(scene: Scene) -> str:
    """The edited scene in full: every object's size, colour, shape and place, then the background."""
    return scene_caption(scene, ATTRIBUTES, with_background=True)


TASKS = [
    Task("text_to_image", "draw 1-3 objects asked for in words (colours, shapes, often sizes and places)",
         build_text_to_image),
    Task("image_edit", "edit an image: recolour, reshape, resize, remove, add or move one object", build_image_edit),
]
