"""Questions about one scene, each with its answer derived from the scene.

Every builder returns a :class:`Question` (text without ``<image>`` or format
instruction, answer format, gold answer, accepted answers and format-specific fields)
or ``None`` when the scene does not allow an unambiguous question of that kind; tasks
then draw another scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmbridge.boxes import write_box, write_ref
from mmbridge.eval.prompts import LETTERS
from mmbridge.worlds.miniworld.language import (answer_variants, article, count_answers, detailed_captions,
                                                matches, noun_phrase, refer, short_captions, unique_descriptions)
from mmbridge.worlds.miniworld.scene import ObjectSpec, Scene, SceneObject
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import SIZE_SYNONYMS, Pair

DIRECTION_MARGIN = 0.12  # objects compared left/right or above/below differ by at least this share of the side
NEAREST_MARGIN = 0.08  # the nearest object is closer than the second nearest by at least this share
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
EXTREMES = {"left": "furthest to the left", "right": "furthest to the right", "above": "closest to the top",
            "below": "closest to the bottom"}
SHORT_CAPTION_PROMPTS = ("Describe the image briefly.", "Write a short caption for the image.",
                         "Give a one-sentence description of the picture.", "Summarize the image in one sentence.")
DETAILED_CAPTION_PROMPTS = ("Describe the image in detail.",
                            "Give a detailed description of everything in the picture.",
                            "Describe every object in the image with its size, colour and position.",
                            "Write a detailed description of the scene.")


@dataclass
class Question:
    """One question and its gold answer; ``choices``/``box``/``references``/``pope`` only where they apply."""

    text: str
    format: str
    answer: str
    answers: list[str]
    choices: list[str] | None = None
    box: list[int] | None = None
    references: list[str] | None = None
    pope: str | None = None

    def fields(self) -> dict:
        """The sample fields of this question (format-specific ones only when set)."""
        fields = {"question": self.text, "format": self.format, "answer": self.answer, "answers": self.answers}
        extras = {"choices": self.choices, "box": self.box, "references": self.references, "pope": self.pope}
        fields.update({key: value for key, value in extras.items() if value is not None})
        return fields


def object_answers(target: SceneObject, objects: list[SceneObject]) -> list[str]:
    """Every accepted way to name ``target`` as an answer (each unique description, with articles)."""
    phrases = [noun_phrase(target, attributes) for attributes in unique_descriptions(target, objects)]
    return list(dict.fromkeys(variant for phrase in phrases for variant in answer_variants(phrase)))


def colour_question(world: World, scene: Scene, target: SceneObject) -> Question | None:
    """"What colour is the large circle?" → ``"red"``."""
    name = refer(world, target, scene.objects, exclude=("colour",))
    if name is None:
        return None
    template = world.choice(("What colour is the {}?", "What is the colour of the {}?", "What color is the {}?"))
    return Question(template.format(name), "short", target.colour, [target.colour])


def shape_question(world: World, scene: Scene, target: SceneObject) -> Question | None:
    """"What shape is the red object?" → ``"circle"``."""
    name = refer(world, target, scene.objects, exclude=("shape",))
    if name is None:
        return None
    template = world.choice(("What shape is the {}?", "What is the shape of the {}?", "Which shape is the {}?"))
    return Question(template.format(name), "short", target.shape, [target.shape])


def size_question(world: World, scene: Scene, target: SceneObject) -> Question | None:
    """"Is the red circle small or large?" → ``"large"``."""
    name = refer(world, target, scene.objects, exclude=("size",))
    if name is None:
        return None
    template = world.choice(("What size is the {}?", "Is the {} small or large?", "How big is the {}: small or large?"))
    return Question(template.format(name), "short", target.size, list(SIZE_SYNONYMS[target.size]))


ATTRIBUTE_QUESTIONS = {"colour": colour_question, "shape": shape_question, "size": size_question}


def count_question(world: World, scene: Scene, exemplar: SceneObject | ObjectSpec,
                   attributes: tuple[str, ...]) -> Question:
    """"How many red circles are there?" → the number of objects sharing ``attributes`` with ``exemplar``."""
    phrase = noun_phrase(exemplar, attributes, plural=True)
    template = world.choice(("How many {} are there?", "How many {} are in the image?", "Count the {} in the image."))
    count = sum(matches(item, exemplar, attributes) for item in scene.objects)
    return Question(template.format(phrase), "short", str(count), count_answers(count))


def existence_question(scene: Scene, pair: Pair, pope: str | None = None) -> Question:
    """POPE's "Is there a red circle in the image?", answered from the scene."""
    colour, shape = pair
    present = any(item.pair == pair for item in scene.objects)
    answer = "yes" if present else "no"
    return Question(f"Is there {article(f'{colour} {shape}')} in the image?", "yesno", answer, [answer], pope=pope)


def relation_holds(first: SceneObject, second: SceneObject, relation: str, side: int) -> bool | None:
    """Whether ``first`` is ``relation`` of ``second``; ``None`` when they are too close to tell."""
    along_x = relation in ("left", "right")
    difference = (first.x - second.x) if along_x else (first.y - second.y)
    if abs(difference) < DIRECTION_MARGIN * side:
        return None
    return difference < 0 if relation in ("left", "above") else difference > 0


def relation_question(world: World, scene: Scene, subject: SceneObject) -> Question | None:
    """"Is the red circle to the left of the blue star?" with an unambiguous yes or no."""
    side = min(scene.width, scene.height)
    candidates = [(other, relation, truth) for other in scene.objects if other is not subject
                  for relation in RELATIONS
                  if (truth := relation_holds(subject, other, relation, side)) is not None]
    wanted = world.chance(0.5)
    preferred = [candidate for candidate in candidates if candidate[2] == wanted] or candidates
    if not preferred:
        return None
    other, relation, truth = world.choice(preferred)
    subject_name, other_name = refer(world, subject, scene.objects), refer(world, other, scene.objects)
    if subject_name is None or other_name is None:
        return None
    answer = "yes" if truth else "no"
    return Question(f"Is the {subject_name} {RELATIONS[relation]} the {other_name}?", "yesno", answer, [answer])


def nearest_question(world: World, scene: Scene, anchor: SceneObject) -> Question | None:
    """"Which object is nearest to the red circle?" when one object is clearly the nearest."""
    others = sorted((item for item in scene.objects if item is not anchor),
                    key=lambda item: math.dist((item.x, item.y), (anchor.x, anchor.y)))
    side = min(scene.width, scene.height)
    if len(others) < 2:
        return None
    first, second = (math.dist((item.x, item.y), (anchor.x, anchor.y)) for item in others[:2])
    anchor_name, nearest_name = refer(world, anchor, scene.objects), refer(world, others[0], scene.objects)
    if second - first < NEAREST_MARGIN * side or anchor_name is None or nearest_name is None:
        return None
    template = world.choice(("Which object is nearest to the {}?", "What is the closest object to the {}?"))
    return Question(template.format(anchor_name), "short", nearest_name, object_answers(others[0], scene.objects))


def extreme_question(world: World, scene: Scene, target: SceneObject) -> Question | None:
    """"Which object is furthest to the left?" when ``target`` clearly is."""
    side = min(scene.width, scene.height)
    others = [item for item in scene.objects if item is not target]
    directions = [direction for direction in EXTREMES
                  if others and all(relation_holds(target, item, direction, side) for item in others)]
    name = refer(world, target, scene.objects)
    if not directions or name is None:
        return None
    return Question(f"Which object is {EXTREMES[world.choice(directions)]}?", "short", name,
                    object_answers(target, scene.objects))


def grounding_question(world: World, scene: Scene, target: SceneObject) -> Question | None:
    """Referring expression → box, in the world's box format: "Give the bounding box of the small red circle." →
    ``[x0, y0, x1, y1]`` (plain), or Qwen-VL's "Give the bounding box of the <ref>small red circle</ref>." →
    ``<ref>small red circle</ref><box>(x0,y0),(x1,y1)</box>``. ``box`` stays the canonical 000–999 box."""
    name = refer(world, target, scene.objects)
    if name is None:
        return None
    box = target.to_dict(scene.width, scene.height)["box_999"]
    template = world.choice(("Give the bounding box of the {}.", "Where is the {}?", "Locate the {} in the image.",
                             "Find the {}."))
    answer = (write_ref(name, "qwen") if world.box_format == "qwen" else "") + write_box(box, world.box_format)
    return Question(template.format(write_ref(name, world.box_format)), "box", answer, [answer], box=box)


def describe_region_question(world: World, scene: Scene, target: SceneObject) -> Question:
    """Box → description: "What is the object in the region [..]?" (or ``<box>(..),(..)</box>``) →
    ``"large red circle"``."""
    box = target.to_dict(scene.width, scene.height)["box_999"]
    template = world.choice(("What is the object in the region {}?", "Name the object inside {}.",
                             "What object is at {}?"))
    full = noun_phrase(target)
    answers = list(dict.fromkeys(answer_variants(full) + answer_variants(noun_phrase(target, ("colour", "shape")))))
    return Question(template.format(write_box(box, world.box_format)), "short", full, answers, box=box)


def caption_question(world: World, scene: Scene, detailed: bool) -> Question:
    """A caption request; the gold is one of the reference captions, all of which are kept."""
    references = detailed_captions(scene) if detailed else short_captions(scene)
    prompt = world.choice(DETAILED_CAPTION_PROMPTS if detailed else SHORT_CAPTION_PROMPTS)
    return Question(prompt, "caption", world.choice(references), list(references), references=list(references))


def as_multiple_choice(world: World, question: Question, pool: list[str], count: int = 4) -> Question | None:
    """The same question with lettered options: the gold text plus distractors from ``pool``."""
    wrong = [option for option in pool if option not in question.answers]
    if len(wrong) < count - 1:
        return None
    choices = world.shuffled([question.answer] + world.sample(wrong, count - 1))
    letter = LETTERS[choices.index(question.answer)]
    return Question(question.text, "mc", letter, [letter, question.answer], choices=choices,
                    box=question.box, pope=question.pope)
