"""Scoring generated images without people: MiniWorld knows what was asked, so the pixels are checked against it.

:func:`score_image` finds the objects of an image (:func:`~mmbridge.worlds.miniworld.blobs.find_blobs`: saturated
blobs on a light background, any image size, rescaled to the target's canvas) and checks, per attribute asked:

- ``count``: as many blobs as objects were asked for;
- ``colour``, ``shape``, ``size``, ``position``: every requested object has a blob of its own with that value of
  the attribute (the colours of the blobs hold the requested colours, as many times as requested; likewise for the
  rest). Colour is the palette colour nearest to the median RGB of the blob's core; shape comes from the shape
  probe fitted on MiniWorld's renders (:mod:`.shape_probe`); size is ``large`` when the extent that the blob's area
  gives for its shape is at least :data:`SIZE_SPLIT` of the side (halfway between the largest small and the
  smallest large extent); position is the ninth of the canvas (``"top left"`` … ``"bottom right"``) of the
  blob's box centre;
- ``all``: the count is right and each object has a blob of its own showing *all* its asked attributes at once
  (so a red square and a blue circle pass ``colour`` and ``shape`` for "a red circle and a blue square", not
  ``all``).

Only pixels are read: no learned model from outside, PIL and single-threaded numpy only, no randomness, so the same
image scores the same on every run and thread count (float sums may differ in their last bits between CPUs; every
threshold keeps a margin far wider). Measured robustness: README "Scoring generated images".
:func:`score_requests` scores a model's images for the ``outputs`` of samples; :func:`attribute_accuracy` gives
each attribute's accuracy with its 95% Wilson interval.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from PIL import Image

from mmbridge.eval.metrics import wilson_interval
from mmbridge.worlds.miniworld.blobs import Blob, find_blobs
from mmbridge.worlds.miniworld.generation import ATTRIBUTES
from mmbridge.worlds.miniworld.geometry import region_name
from mmbridge.worlds.miniworld.scene import STANDARD_SCALE, Scene
from mmbridge.worlds.miniworld.shape_probe import shape_probe

SIZE_SPLIT = (STANDARD_SCALE.small[1] + STANDARD_SCALE.large[0]) / 2  # 0.255 of the side: small ends at 0.21
CHECKED = ATTRIBUTES[1:]  # the attributes matched object by object (count is a number)


def describe_blob(blob: Blob, width: int, height: int) -> dict[str, str]:
    """What a blob shows: its colour, shape, size class and ninth of the canvas."""
    probe = shape_probe()
    shape = probe.shape(blob)
    size = "large" if probe.extent(blob, shape) >= SIZE_SPLIT * min(width, height) else "small"
    return {"colour": blob.colour, "shape": shape, "size": size, "position": region_name(*blob.centre, width, height)}


def describe_image(image: Image.Image, width: int, height: int) -> list[dict[str, str]]:
    """What each object found in ``image`` (any size, seen on a ``width`` x ``height`` canvas) shows."""
    return [describe_blob(blob, width, height) for blob in find_blobs(image, width, height)]


def requested_objects(scene: Scene) -> list[dict[str, str]]:
    """What each object of ``scene`` should show, in the words of :func:`describe_blob`."""
    return [{"colour": item.colour, "shape": item.shape, "size": item.size,
             "position": region_name(item.x, item.y, scene.width, scene.height)} for item in scene.objects]


def as_scene(target: Scene | dict) -> Scene:
    """``target`` as a :class:`Scene` (a ``Scene.to_dict`` mapping is read back); scenes with text are refused."""
    scene = target if isinstance(target, Scene) else Scene.from_dict(target)
    if scene.texts:
        raise ValueError(f"score_image checks objects only; the target scene holds {len(scene.texts)} text(s)")
    return scene


def check_asked(asked: Sequence[str] | None) -> tuple[str, ...]:
    """The attributes to check, in :data:`ATTRIBUTES` order (all of them when ``None``)."""
    if asked is None:
        return ATTRIBUTES
    unknown = sorted(set(asked) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown} to score; known: {', '.join(ATTRIBUTES)}")
    return tuple(name for name in ATTRIBUTES if name in asked)


def score_image(image: Image.Image, target: Scene | dict, asked: Sequence[str] | None = None) -> dict[str, bool]:
    """Whether ``image`` shows ``target`` (a :class:`Scene` or its ``to_dict``), per attribute in ``asked``
    (default: all of :data:`ATTRIBUTES`), plus ``all``. See the module docstring for each check."""
    scene, asked = as_scene(target), check_asked(asked)
    seen = describe_image(image, scene.width, scene.height)
    return score_objects(seen, requested_objects(scene), asked)


def score_objects(seen: list[dict[str, str]], wanted: list[dict[str, str]],
                  asked: tuple[str, ...]) -> dict[str, bool]:
    """The checks of :func:`score_image` on described objects: ``seen`` in the image, ``wanted`` by the request."""
    scores = {}
    if "count" in asked:
        scores["count"] = len(seen) == len(wanted)
    for name in CHECKED:
        if name in asked:
            needed = Counter(item[name] for item in wanted)
            shown = Counter(item[name] for item in seen)
            scores[name] = all(shown[value] >= number for value, number in needed.items())
    together = [name for name in CHECKED if name in asked]
    bound = _perfect_matching(wanted, seen, lambda want, shown: all(want[name] == shown[name] for name in together))
    scores["all"] = all(scores.values()) and bound
    return scores


def _perfect_matching(wanted: list[dict], seen: list[dict], agree: Any) -> bool:
    """Whether every wanted object gets a seen object of its own that it ``agree``s with (augmenting paths)."""
    owner: dict[int, int] = {}  # seen index -> wanted index

    def claim(want: int, visited: set[int]) -> bool:
        for index, shown in enumerate(seen):
            if index not in visited and agree(wanted[want], shown):
                visited.add(index)
                if index not in owner or claim(owner[index], visited):
                    owner[index] = want
                    return True
        return False

    return all(claim(want, set()) for want in range(len(wanted)))


def _outputs_of(sample: Any) -> tuple[str, list[dict]]:
    """``(id, outputs)`` of a :class:`~mmbridge.data.Sample` or a record dict."""
    if isinstance(sample, dict):
        return str(sample.get("id")), sample.get("outputs") or []
    return sample.id, sample.outputs or []


def score_requests(images: list[list[Image.Image]], samples: Sequence[Any]) -> dict:
    """Score a model's generated images against the ``outputs`` of ``samples`` (Samples or records).

    ``images[i]`` are the images generated for sample ``i``, in the order of its output markers; an output with no
    image (the model emitted no signal tokens for it) fails every check. Returns ``{"scores": [one dict per
    output: "id", "output" (its position), "generated" (bool), then score_image's checks], "attributes":
    attribute_accuracy(...)}``.
    """
    if len(images) != len(samples):
        raise ValueError(f"score_requests got images for {len(images)} samples but {len(samples)} samples")
    scores = []
    for generated, sample in zip(images, samples):
        identifier, outputs = _outputs_of(sample)
        for number, output in enumerate(outputs):
            if output.get("scene") is None:
                raise ValueError(f"sample {identifier!r}: outputs[{number}] has no target 'scene' to score against")
            asked = check_asked(output.get("asked"))
            checks = score_image(generated[number], output["scene"], asked) if number < len(generated) \
                else {**{name: False for name in asked}, "all": False}
            scores.append({"id": identifier, "output": number, "generated": number < len(generated), **checks})
    return {"scores": scores, "attributes": attribute_accuracy(scores)}


def attribute_accuracy(scores: Sequence[dict]) -> dict[str, dict]:
    """Per attribute found in ``scores`` (dicts of booleans; other keys are ignored): ``{"correct", "n",
    "accuracy", "interval": [low, high]}``, the interval being the 95% Wilson interval."""
    summary = {}
    for name in ATTRIBUTES + ("all",):
        values = [bool(score[name]) for score in scores if name in score]
        if values:
            correct = sum(values)
            summary[name] = {"correct": correct, "n": len(values), "accuracy": correct / len(values),
                             "interval": list(wilson_interval(correct, len(values)))}
    return summary
