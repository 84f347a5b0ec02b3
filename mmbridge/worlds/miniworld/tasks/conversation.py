"""Multi-turn instruction conversations about one scene, mixing captions, attributes, counts, existence,
spatial relations and grounding (format "free": every turn has its own answer)."""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import (Question, caption_question, colour_question, count_question,
                                                 describe_region_question, existence_question, grounding_question,
                                                 relation_question, shape_question, size_question)
from mmbridge.worlds.miniworld.scene import Scene
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene
from mmbridge.worlds.miniworld.tasks.existence import negative_pair

KINDS = ("caption", "detailed", "colour", "shape", "size", "count", "exists", "relation", "grounding", "describe")


def build_conversation(world: World) -> Episode | None:
    """2–4 questions of different kinds about a scene of 2–4 objects."""
    scene = focus_scene(world, 2, 4)
    questions = []
    for kind in world.sample(KINDS, world.integer(2, 4)):
        question = turn_question(world, scene, kind)
        if question is not None:
            questions.append(question)
    return Episode([scene], questions) if len(questions) >= 2 else None


def turn_question(world: World, scene: Scene, kind: str) -> Question | None:
    """One turn of ``kind``; attribute, relation and grounding turns are about the focus object."""
    focus = scene.objects[0]
    if kind in ("caption", "detailed"):
        return caption_question(world, scene, detailed=kind == "detailed")
    if kind in ("colour", "shape", "size"):
        return {"colour": colour_question, "shape": shape_question, "size": size_question}[kind](world, scene, focus)
    if kind == "count":
        return count_question(world, scene, focus, world.choice((("colour",), ("shape",), ())))
    if kind == "exists":
        present = {item.pair for item in scene.objects}
        pair = focus.pair if world.chance(0.5) else negative_pair(world, present, "random")
        return existence_question(scene, pair) if pair else None
    if kind == "relation":
        return relation_question(world, scene, focus)
    if kind == "grounding":
        return grounding_question(world, scene, focus)
    return describe_region_question(world, scene, focus)


TASKS = [Task("conversation", "multi-turn conversations mixing the single-image tasks", build_conversation)]
