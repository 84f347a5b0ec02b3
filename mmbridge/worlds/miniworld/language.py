"""Words for scenes: noun phrases, referring expressions, counts, positions and captions.

Referring expressions are checked against the scene: :func:`refer` only returns a
phrase that matches exactly one object, so every question names its object unambiguously.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations

from mmbridge.worlds.miniworld.scene import ObjectSpec, Scene, SceneObject, TextItem
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import NUMBER_WORDS, ORDINALS, SHAPE_PLURALS

ATTRIBUTES = ("size", "colour", "shape")


def article(phrase: str) -> str:
    """``"a red circle"`` / ``"an orange star"``."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def number_word(count: int) -> str:
    return NUMBER_WORDS[count] if 0 <= count < len(NUMBER_WORDS) else str(count)


def count_answers(count: int) -> list[str]:
    """Accepted answers for a count: the digits and the word."""
    return [str(count), number_word(count)]


def ordinal(position: int) -> str:
    """``1`` → ``"first"``."""
    return ORDINALS[position] if 0 <= position < len(ORDINALS) else f"{position}th"


def noun_phrase(item: SceneObject | ObjectSpec, attributes: tuple[str, ...] = ATTRIBUTES,
                plural: bool = False) -> str:
    """The object described by some of its attributes: ``"large red circle"``, ``"red object"``, ``"circles"``."""
    words = [getattr(item, name) for name in ("size", "colour") if name in attributes]
    if "shape" in attributes:
        words.append(SHAPE_PLURALS[item.shape] if plural else item.shape)
    else:
        words.append("objects" if plural else "object")
    return " ".join(words)


def matches(item: SceneObject, target: SceneObject | ObjectSpec, attributes: tuple[str, ...]) -> bool:
    """Whether ``item`` shares every attribute in ``attributes`` with ``target``."""
    return all(getattr(item, name) == getattr(target, name) for name in attributes)


def unique_descriptions(target: SceneObject, objects: list[SceneObject],
                        exclude: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Attribute sets (fewest first) that single out ``target`` among ``objects``, never using ``exclude``."""
    usable = [name for name in ATTRIBUTES if name not in exclude]
    found = []
    for length in range(1, len(usable) + 1):
        for attributes in combinations(usable, length):
            if sum(matches(item, target, attributes) for item in objects) == 1:
                found.append(attributes)
    return found


def refer(world: World, target: SceneObject, objects: list[SceneObject], exclude: tuple[str, ...] = ()) -> str | None:
    """A noun phrase naming exactly ``target`` (usually the shortest), or ``None`` when none exists."""
    options = unique_descriptions(target, objects, exclude)
    if not options:
        return None
    shortest = [attributes for attributes in options if len(attributes) == len(options[0])]
    chosen = world.choice(shortest) if world.chance(0.75) else world.choice(options)
    return noun_phrase(target, chosen)


def answer_variants(phrase: str) -> list[str]:
    """``"red circle"`` → ``["red circle", "the red circle", "a red circle"]``."""
    return [phrase, f"the {phrase}", article(phrase)]


def region_phrase(region: str) -> str:
    """``"top left"`` → ``"in the top left"``, ``"top"`` → ``"at the top"``, ``"left"`` → ``"on the left"``."""
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return f"in the {region}"


def grouped_phrases(objects: list[SceneObject], with_size: bool) -> list[str]:
    """Objects grouped by identical description, left to right: ``["two red circles", "a blue star"]``."""
    attributes = ATTRIBUTES if with_size else ("colour", "shape")
    ordered = sorted(objects, key=lambda item: item.x)
    counts = Counter(noun_phrase(item, attributes) for item in ordered)
    phrases, seen = [], set()
    for item in ordered:
        singular = noun_phrase(item, attributes)
        if singular in seen:
            continue
        seen.add(singular)
        count = counts[singular]
        plural = f"{number_word(count)} {noun_phrase(item, attributes, plural=True)}"
        phrases.append(article(singular) if count == 1 else plural)
    return phrases


def join_list(phrases: list[str]) -> str:
    """``["a", "b", "c"]`` → ``"a, b and c"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def text_phrase(scene: Scene) -> str:
    """``'the word "apple" and the number "42"'`` for the texts of a scene ("" when none)."""
    return join_list([f'the {item.spec.kind} "{item.text}"' for item in scene.texts])


def short_captions(scene: Scene) -> list[str]:
    """Several one-sentence captions of the scene (objects without sizes or positions, plus any text)."""
    objects = join_list(grouped_phrases(scene.objects, with_size=False))
    texts = text_phrase(scene)
    with_text = f"{objects}, with {texts} written nearby" if texts else objects
    return [
        _sentence(with_text),
        _sentence(f"{with_text} on {scene.background.describe()}"),
        _sentence(f"an image of {with_text}"),
        _sentence(f"there {'is' if _is_single(scene) else 'are'} {with_text}"),
    ]


def detailed_captions(scene: Scene) -> list[str]:
    """Several multi-sentence descriptions: every object with size, colour, shape and position, then text."""
    count = len(scene.objects)
    plural = "s" if count != 1 else ""
    opening = f"The image shows {number_word(count)} object{plural} on {scene.background.describe()}."
    left_to_right = sorted(scene.objects, key=lambda item: item.x)
    top_to_bottom = sorted(scene.objects, key=lambda item: item.y)
    texts = [f'The {item.spec.kind} "{item.text}" is written in {item.spec.colour} {_where(scene, item)}.'
             for item in scene.texts]
    first = [_sentence(f"{article(noun_phrase(item))} is {_where(scene, item)}") for item in left_to_right]
    second = [_sentence(f"{_where(scene, item)} there is {article(noun_phrase(item))}") for item in top_to_bottom]
    return [" ".join([opening] + first + texts), " ".join([opening] + second + texts)]


def _where(scene: Scene, item: SceneObject | TextItem) -> str:
    """Where ``item`` is: "in the top left", "at the bottom", …"""
    return region_phrase(item.to_dict(scene.width, scene.height)["region"])


def _is_single(scene: Scene) -> bool:
    return len(scene.objects) == 1


def _sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    return text[:1].upper() + text[1:] + "."
