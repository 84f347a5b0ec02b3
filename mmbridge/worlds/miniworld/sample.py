"""Samples: an episode turned into a LLaVA-format record with evaluation fields, plus its rendered images.

``make_sample(task, split, index, seed)`` is random access and deterministic. The
record is a LLaVA conversation (``id``, ``image``, ``conversations``) plus ``task``,
``split``, ``index``, ``seed``, ``question``, ``format``, ``answer``, ``answers``, the
format-specific ``choices``/``box``/``references``/``pope``, and ``scene``, the full
symbolic description. Multi-turn conversations have format ``"free"``, ``question`` and
``answer`` ``None``, and their per-turn questions under ``turns``. Generation requests have format ``"image"``:
the answer is the reply ending with ``<image_out>``, the record's ``outputs`` hold the target of each marker
(:mod:`.generation`; their images ``images/ID-out1.png``…), an edit's kind is its ``edit``, and a text request
has no ``image`` (its ``scene`` is the scene asked for).

``box_format`` (``plain``, the default, or ``qwen``; :mod:`mmbridge.boxes`) is how grounding questions and
answers write boxes in the text; it draws nothing, so both formats give the same scene, images and ``box``.
"""

from __future__ import annotations

from typing import Iterator

from PIL import Image

from mmbridge.eval.prompts import format_prompt
from mmbridge.worlds.miniworld.render import render_image
from mmbridge.worlds.miniworld.splits import World, sample_generator
from mmbridge.worlds.miniworld.task import Episode
from mmbridge.worlds.miniworld.tasks import get_task

IMAGE_TOKEN = "<image>"
IMAGE_DIRECTORY = "images"
GENERATION_FORMAT = "image"  # a request answered with an image: the prompt is the request as written


def sample_id(task: str, split: str, index: int) -> str:
    """``"attribute-test-000012"``."""
    return f"{task}-{split}-{index:06d}"


def make_episode(task: str, split: str, index: int, seed: int = 0, box_format: str = "plain") -> Episode:
    """The episode (drawables and questions) of one sample, without rendering."""
    world = World(sample_generator(task, split, index, seed), split, index, box_format)
    return get_task(task).episode(world)


def image_names(identifier: str, episode: Episode) -> list[str]:
    """Relative PNG paths: ``images/ID.png``, or ``images/ID-1.png``… (images), ``images/ID-f00.png``… (frames),
    none for a text request."""
    if episode.layout == "text":
        return []
    if episode.layout == "single":
        return [f"{IMAGE_DIRECTORY}/{identifier}.png"]
    if episode.layout == "video":
        return [f"{IMAGE_DIRECTORY}/{identifier}-f{frame:02d}.png" for frame in range(len(episode.images))]
    return [f"{IMAGE_DIRECTORY}/{identifier}-{position}.png" for position in range(1, len(episode.images) + 1)]


def image_prefix(episode: Episode) -> str:
    """The placeholders that open the first user turn, one ``<image>`` per image, in order."""
    if episode.layout == "text":
        return ""
    if episode.layout == "single":
        return f"{IMAGE_TOKEN}\n"
    if episode.layout == "video":
        return IMAGE_TOKEN * len(episode.images) + "\n"
    return "".join(f"Image {position}: {IMAGE_TOKEN}\n" for position in range(1, len(episode.images) + 1))


def episode_record(task: str, split: str, index: int, seed: int, episode: Episode, box_format: str = "plain") -> dict:
    """The LLaVA-format record with evaluation fields for ``episode`` (an interleaved document's ``texts`` and
    ``images`` for layout ``document``)."""
    identifier = sample_id(task, split, index)
    names = image_names(identifier, episode)
    if episode.layout == "document":
        return {"id": identifier, "image": names, "texts": [question.answer for question in episode.questions],
                "images": names, "task": task, "split": split, "index": index, "seed": seed,
                "scene": episode.scene()}
    conversations = []
    instructed: set[str] = set()  # a format's instruction is given at its first turn and holds for the rest
    for position, question in enumerate(episode.questions):
        prompt = question.text if question.format == GENERATION_FORMAT else \
            format_prompt(question.text, question.format, question.choices, question.format not in instructed,
                          box_format)
        instructed.add(question.format)
        conversations.append({"from": "human", "value": (image_prefix(episode) if position == 0 else "") + prompt})
        conversations.append({"from": "gpt", "value": question.answer})
    record = {"id": identifier, "image": names[0] if episode.layout == "single" else names,
              "conversations": conversations, "task": task, "split": split, "index": index, "seed": seed}
    if episode.layout == "text":
        del record["image"]  # a text-only LLaVA record
    if episode.is_conversation:
        record.update({"question": None, "format": "free", "answer": None, "answers": [],
                       "turns": [question.fields() for question in episode.questions]})
    else:
        record.update(episode.questions[0].fields())
    if episode.layout == "video":
        record["video"] = True  # the images are the frames of one clip, in order
    if episode.outputs:
        record["outputs"] = [output.to_record(name) for output, name in zip(episode.outputs,
                                                                            output_names(identifier, episode))]
    if episode.edit is not None:
        record["edit"] = episode.edit
    record["scene"] = episode.scene()
    return record


def output_names(identifier: str, episode: Episode) -> list[str]:
    """Relative PNG paths of the target images: ``images/ID-out1.png``, ``images/ID-out2.png``…"""
    return [f"{IMAGE_DIRECTORY}/{identifier}-out{number}.png" for number in range(1, len(episode.outputs) + 1)]


def make_record(task: str, split: str, index: int, seed: int = 0, box_format: str = "plain") -> dict:
    """The sample's record only (no image is drawn)."""
    return episode_record(task, split, index, seed, make_episode(task, split, index, seed, box_format), box_format)


def render_images(task: str, split: str, index: int, seed: int = 0) -> list[Image.Image]:
    """The sample's images only, in placeholder order (what streamed samples load)."""
    return [render_image(drawable) for drawable in make_episode(task, split, index, seed).images]


def make_sample(task: str, split: str, index: int, seed: int = 0,
                box_format: str = "plain") -> tuple[dict, list[Image.Image]]:
    """Sample ``index`` of ``task`` on ``split``: its record and its images. Deterministic in all its arguments."""
    episode = make_episode(task, split, index, seed, box_format)
    return (episode_record(task, split, index, seed, episode, box_format),
            [render_image(drawable) for drawable in episode.images])


def iter_samples(task: str, split: str, n: int, seed: int = 0,
                 box_format: str = "plain") -> Iterator[tuple[dict, list[Image.Image]]]:
    """Samples ``0 … n-1`` of ``task`` on ``split``."""
    get_task(task)
    for index in range(n):
        yield make_sample(task, split, index, seed, box_format)
