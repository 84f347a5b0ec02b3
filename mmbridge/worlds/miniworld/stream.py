"""Streaming: MiniWorld samples as in-memory :class:`~mmbridge.data.Sample` objects, images drawn on access.

This module registers the data source type ``miniworld`` (:data:`mmbridge.data.sources.SOURCE_TYPES`) when it is
imported (importing ``mmbridge`` imports it). A data source ``{"miniworld": {"task": ..., "split": ..., "n": ...,
"seed": ..., "box_format": ...}}`` builds the conversations up front (cheap) and gives each sample an
``image_loader`` that
renders its images when the processor asks for them, so training needs no files. One-scene
samples carry their objects as ``regions`` (box, colour, shape, size) for region–word alignment. Generation
requests carry their ``outputs`` with ``image`` ``None`` and an ``output_loader`` that draws each target from its
``scene`` (:func:`~mmbridge.worlds.miniworld.generation.output_images`).
``box_format`` (``plain``, the default, or ``qwen``) is how grounding turns write boxes; regions stay in 000–999.
"""

from __future__ import annotations

import functools

from mmbridge.boxes import check_box_format
from mmbridge.data.formats.llava import ROLES, Sample
from mmbridge.data.sources import SOURCE_TYPES, SourceType
from mmbridge.worlds.miniworld.generation import output_images
from mmbridge.worlds.miniworld.sample import make_record, render_images
from mmbridge.worlds.miniworld.splits import check_split
from mmbridge.worlds.miniworld.tasks import get_task

REQUIRED_KEYS = ("task", "split", "n")
OPTIONAL_KEYS = ("seed", "box_format")


def load_samples(spec: dict, source: str = "") -> list[Sample]:
    """The samples of a ``miniworld`` source spec ``{task, split, n, seed=0, box_format=plain}``, images rendered
    lazily."""
    task, split, count, seed = check_spec(spec)
    box_format = spec.get("box_format", "plain")
    samples = []
    for index in range(count):
        record = make_record(task, split, index, seed, box_format)
        names = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        images = [f"miniworld://{seed}/{name}" for name in names]
        loader = functools.partial(render_images, task, split, index, seed)
        if "texts" in record:  # an interleaved document: image i, then text i
            chunks = [{"image": image, "text": text} for image, text in zip(images, record["texts"])]
            samples.append(Sample(id=record["id"], conversation=[], images=images, source=source,
                                  image_loader=loader, document=chunks))
            continue
        conversation = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
        outputs = [{**output, "image": None} for output in record["outputs"]] if "outputs" in record else None
        output_loader = functools.partial(output_images, outputs) if outputs else None
        samples.append(Sample(id=record["id"], conversation=conversation, images=images, source=source,
                              image_loader=loader, regions=scene_regions(record), video=bool(record.get("video")),
                              outputs=outputs, output_loader=output_loader))
    return samples


def scene_regions(record: dict) -> list[dict] | None:
    """The objects of a one-scene record as regions: box in 0–999 and the words colour, shape and size."""
    scene = record.get("scene")
    if not scene or "objects" not in scene or "image" not in record:  # several images (multi-image, video), a
        return None  # chart, or a text request (its scene is the one asked for, not an image shown)
    return [{"box": item["box_999"], "words": {"colour": item["colour"], "shape": item["shape"], "size": item["size"]}}
            for item in scene["objects"]]


def check_spec(spec: dict) -> tuple[str, str, int, int]:
    """Validate a source spec; errors name the missing or unknown keys."""
    if not isinstance(spec, dict):
        raise ValueError(f"a miniworld source must be a mapping {{task, split, n, seed}}, got {spec!r}")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"miniworld source {spec}: missing {missing}, unknown {unknown}; "
                         f"keys are {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    get_task(spec["task"])
    check_split(spec["split"])
    for key in ("n", "seed"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool)):
            raise ValueError(f"miniworld source {spec}: {key} must be an integer, got {spec[key]!r}")
    check_box_format(spec.get("box_format", "plain"), f"miniworld source {spec}: box_format")
    count, seed = spec["n"], spec.get("seed", 0)
    if count < 1:
        raise ValueError(f"miniworld source {spec}: n must be at least 1")
    if seed < 0:  # numpy's generators take no negative seed: it would fail when the first image is drawn
        raise ValueError(f"miniworld source {spec}: seed must be >= 0, got {seed}")
    return spec["task"], spec["split"], count, seed


def source_stem(spec: dict) -> str:
    """A MiniWorld source's default name: ``miniworld-TASK-SPLIT``."""
    fields = spec if isinstance(spec, dict) else {}
    return f"miniworld-{fields.get('task')}-{fields.get('split')}"


SOURCE_TYPES.add("miniworld", SourceType(load=load_samples, check=check_spec, stem=source_stem))
