"""Multi-turn instruction conversations about one scene (format "free": every turn has its own answer).

``conversation`` mixes captions, attributes, counts, existence, spatial relations and grounding;
``attribute_drill`` asks the colour, shape or size of every object, one count and two balanced
existence questions — several supervised answers per image, the cheapest way to teach a bridge to bind
attributes to objects when each image costs a long visual prefix.
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import (ATTRIBUTE_QUESTIONS, Question, caption_question, count_question,
                                                 describe_region_question, existence_question, grounding_question,
                                                 relation_question)
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
        return ATTRIBUTE_QUESTIONS[kind](world, scene, focus)
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


def build_attribute_drill(world: World) -> Episode | None:
    """Colour, shape or size of each of 1–4 objects, one count, one present and one absent object, in random order.

    Every kind of short answer the attribute, counting and existence tests ask for appears here:
    a drill that left one out (size, say) taught the LoRA to answer a size question with a shape.
    """
    scene = focus_scene(world, 1, 4)
    questions = []
    for target in scene.objects:
        kinds = world.shuffled(list(ATTRIBUTE_QUESTIONS))
        question = next((asked for asked in (ATTRIBUTE_QUESTIONS[kind](world, scene, target) for kind in kinds)
                         if asked is not None), None)
        if question is not None:
            questions.append(question)
    questions.append(count_question(world, scene, scene.objects[0], world.choice((("colour",), ("shape",), ()))))
    present = {item.pair for item in scene.objects}
    absent = negative_pair(world, present, world.choice(("random", "popular", "adversarial")))
    existence = [existence_question(scene, world.choice(sorted(present)))]
    if absent is not None:
        existence.append(existence_question(scene, absent))
    questions += existence
    # every kind in every turn position: the tests ask each kind as the first (and only) question, and a
    # drill that always asked existence last taught the LoRA to answer it only there (yes-ratio 100%)
    return Episode([scene], world.shuffled(questions)) if len(questions) >= 2 else None


TASKS = [Task("conversation", "multi-turn conversations mixing the single-image tasks", build_conversation),
         Task("attribute_drill", "colour/shape/size of every object, a count and balanced existence, multi-turn",
              build_attribute_drill)]
