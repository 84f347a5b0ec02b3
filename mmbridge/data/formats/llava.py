"""LLaVA conversation files → :class:`Sample` lists.

The LLaVA format is a JSON list (or JSON Lines, one object per line) of::

    {"id": "000001", "image": "coco/000001.jpg" | ["a.jpg", "b.jpg"],   # optional: text-only allowed
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}],
     "regions": [{"box": [120, 80, 560, 700], "words": {"colour": "grey", "animal": "cat"}}],  # optional
     "in_context": ["000007", "000012"],                      # optional (MIMIC-IT's ``rel_ins_ids`` too)
     "video": false,                                          # optional: true when the images are one clip's frames
     "outputs": [{"modality": "image", "caption": "A red circle.", "image": "out/000001.png",   # optional
                  "scene": {...}, "asked": ["count", "colour"]}]}

Roles ``human``/``user`` become ``user``, ``gpt``/``assistant`` become ``assistant``,
``system`` stays. A trainable conversation is: an optional leading system turn, then
user and assistant turns alternating, starting with a user turn and ending with an
assistant turn (so there is at least one answer to train on, and every chat template
accepts it). ``regions`` (optional) say which words describe which box of the first image,
for region–word alignment (:mod:`mmbridge.train.region_words`). ``in_context`` (or MIMIC-IT's
``rel_ins_ids``) names other samples of the same file whose turns and images come first, as
solved in-context examples (MIMIC-IT, arXiv 2306.05425): the model sees them, and only the
sample's own replies are labelled. ``outputs`` (optional) are the images the assistant answers with (NExT-GPT's
any-to-any output): each assistant marker ``<image_out>`` (:data:`OUTPUT_MARKERS`) has one entry, in order, with
the caption a generator is conditioned on, the target image's path (relative like ``image``; ``null`` when there
is none) and, optionally, the target ``scene`` and the ``asked`` attributes that scoring checks
(:mod:`mmbridge.worlds.miniworld.scoring`). Every error names the file, the sample index and id, and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OUTPUT_MARKERS = {"image": "<image_out>"}  # per output modality, the text an assistant turn holds for each output
OUTPUT_KEYS = ("modality", "caption", "image", "scene", "asked")
_MODALITY_OF = {marker: modality for modality, marker in OUTPUT_MARKERS.items()}


@dataclass
class Sample:
    """One training conversation with its images (absolute paths, in placeholder order).

    ``image_loader``, when set, returns the images in memory instead of opening ``images``
    (streamed synthetic data); ``images`` then only names them. ``output_loader`` likewise returns the target
    image of each of ``outputs`` (streamed requests, whose ``outputs`` name no file). Neither is ever serialised.
    ``regions`` (optional) name what lies where in the first image, for region–word alignment
    (:mod:`mmbridge.train.region_words`): ``{"box": [x0, y0, x1, y1]`` in 0–999 of the image's
    width and height, ``"words": {attribute: word}}``, e.g. ``{"colour": "red", "shape": "star"}``.
    """

    id: str
    conversation: list[dict]
    images: list[str] = field(default_factory=list)
    source: str = ""
    image_loader: Callable[[], list[Image.Image]] | None = field(default=None, repr=False, compare=False)
    regions: list[dict] | None = None
    video: bool = False  # the images are the frames of one video (a model that takes video reads them as one)
    context_turns: int = 0  # leading turns shown as in-context examples (``in_context``): seen, never labelled
    document: list[dict] | None = None  # an interleaved document's chunks {"image", "text"} (formats/interleaved.py)
    # what the assistant's output markers stand for, in order: {"modality", "caption", "image": absolute path or
    # None, "scene", "asked"} (see the module docstring)
    outputs: list[dict] | None = None
    output_loader: Callable[[], list[Image.Image]] | None = field(default=None, repr=False, compare=False)


def load_llava_json(path: str, image_root: str | None = None, source: str = "",
                    records: list[Any] | None = None) -> list[Sample]:
    """Read a LLaVA JSON (or ``.jsonl``) file; image paths are resolved against ``image_root``.

    ``image_root`` defaults to the directory holding the file; ``records`` are the file's entries when
    already read. Raises ``ValueError`` naming the file, the sample and the field for any malformed entry.
    """
    records = read_records(path) if records is None else records
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(os.path.basename(path))[0]
    samples = [_parse_record(record, index, path, root, source, stem) for index, record in enumerate(records)]
    return _with_in_context_examples(samples, records, path)


def _with_in_context_examples(samples: list[Sample], records: list[Any], path: str) -> list[Sample]:
    """Samples whose ``in_context`` ids put those samples' turns and images first (their own, not nested)."""
    by_id = {sample.id: sample for sample in samples}
    result = []
    for index, (sample, record) in enumerate(zip(samples, records)):
        named = record.get("in_context", record.get("rel_ins_ids"))
        if not named:
            result.append(sample)
            continue
        where = f"{path}: sample #{index} (id {sample.id!r})"
        if not isinstance(named, list) or not all(isinstance(item, (str, int)) for item in named):
            raise ValueError(f"{where}: 'in_context' must be a list of sample ids, got {named!r}")
        missing = [str(item) for item in named if str(item) not in by_id]
        if missing or sample.id in map(str, named):
            problem = f"names unknown id(s) {missing}" if missing else "names the sample itself"
            raise ValueError(f"{where}: 'in_context' {problem}; ids must be other samples of this file")
        turns, images, outputs = [], [], []
        for item in map(str, named):
            example = by_id[item]
            turns += [turn for turn in example.conversation if turn["role"] != "system"]
            images += example.images
            outputs += example.outputs or []
        own = sample.conversation
        system = own[:1] if own and own[0]["role"] == "system" else []
        conversation = system + turns + own[len(system):]
        outputs += sample.outputs or []
        result.append(dataclasses.replace(sample, conversation=conversation, images=images + sample.images,
                                          context_turns=len(system) + len(turns), outputs=outputs or None,
                                          regions=None))  # regions describe the own first image, no longer first
    return result


def read_records(path: str) -> list[Any]:
    """The file's entries: a JSON list, or one JSON value per non-empty line for ``.jsonl``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: LLaVA data file not found")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".jsonl"):
        return [_decode_json(line, path, f"line {number}") for number, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    records = _decode_json(text, path, "file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def _decode_json(text: str, path: str, where: str) -> Any:
    """``json.loads`` with an error that names the file and the position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({where}): {error.msg} at line {error.lineno} "
                         f"column {error.colno}") from None


def _parse_record(record: Any, index: int, path: str, root: str, source: str, stem: str) -> Sample:
    """Validate one entry and turn it into a :class:`Sample`."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: sample #{index} must be an object, got {type(record).__name__}")
    sample_id = str(record["id"]) if record.get("id") is not None else f"{stem}-{index}"
    where = f"{path}: sample #{index} (id {sample_id!r})"
    conversation = _parse_conversation(record, where)
    images = [os.path.join(root, name) for name in _parse_images(record, where)]
    regions = check_regions(record["regions"], where) if record.get("regions") is not None else None
    video = record.get("video", False)
    if not isinstance(video, bool):
        raise ValueError(f"{where}: field 'video' must be true or false, got {video!r}")
    outputs = check_outputs(record.get("outputs"), conversation, where)
    for output in outputs or []:
        output["image"] = os.path.join(root, output["image"]) if output["image"] is not None else None
    return Sample(id=sample_id, conversation=conversation, images=images, source=source, regions=regions,
                  video=video, outputs=outputs)


def check_outputs(outputs: Any, conversation: list[dict], where: str) -> list[dict] | None:
    """The optional ``outputs`` field, checked against the output markers of ``conversation``'s assistant turns
    (one entry per marker, same modalities in the same order); a copy of each entry, ``image`` and ``scene``
    set (``None`` when absent)."""
    markers = _output_markers(conversation, where)
    if outputs is None:
        if markers:
            raise ValueError(f"{where}: the assistant turns hold {len(markers)} output marker(s) "
                             f"({', '.join(markers)}) but the sample has no 'outputs'")
        return None
    if not isinstance(outputs, list):
        raise ValueError(f"{where}: field 'outputs' must be a list, got {type(outputs).__name__}")
    checked = [_check_output(output, number, where) for number, output in enumerate(outputs)]
    modalities = [output["modality"] for output in checked]
    if modalities != [_MODALITY_OF[marker] for marker in markers]:
        raise ValueError(f"{where}: 'outputs' holds {len(checked)} output(s) {modalities} but the assistant turns "
                         f"hold {len(markers)} output marker(s) {markers}; each marker needs one output, in order")
    return checked


def _output_markers(conversation: list[dict], where: str) -> list[str]:
    """The output markers of the assistant turns, in order (a marker in any other turn is an error)."""
    found = []
    for number, turn in enumerate(conversation):
        positions = sorted((start, marker) for marker in OUTPUT_MARKERS.values()
                           for start in _starts(turn["content"], marker))
        if positions and turn["role"] != "assistant":
            raise ValueError(f"{where}: conversations[{number}] is a {turn['role']!r} turn holding the output "
                             f"marker {positions[0][1]!r}; only assistant turns answer with outputs")
        found += [marker for _, marker in positions]
    return found


def _starts(text: str, marker: str) -> list[int]:
    """Where ``marker`` starts in ``text``, each occurrence."""
    starts, position = [], text.find(marker)
    while position >= 0:
        starts.append(position)
        position = text.find(marker, position + len(marker))
    return starts


def _check_output(output: Any, number: int, where: str) -> dict:
    """One ``outputs`` entry: known keys, a known modality, a caption, an image path or null, a scene mapping."""
    name = f"{where}: outputs[{number}]"
    if not isinstance(output, dict):
        raise ValueError(f"{name} must be an object, got {type(output).__name__}")
    unknown = sorted(set(output) - set(OUTPUT_KEYS))
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {unknown}; fields are {list(OUTPUT_KEYS)}")
    if output.get("modality") not in OUTPUT_MARKERS:
        raise ValueError(f"{name} field 'modality' is {output.get('modality')!r}; expected one of "
                         f"{sorted(OUTPUT_MARKERS)}")
    if not isinstance(output.get("caption"), str) or not output["caption"].strip():
        raise ValueError(f"{name} needs 'caption': the text a generator is conditioned on, got "
                         f"{output.get('caption')!r}")
    image, scene, asked = output.get("image"), output.get("scene"), output.get("asked")
    if image is not None and not (isinstance(image, str) and image):
        raise ValueError(f"{name} field 'image' must be a path or null, got {image!r}")
    if scene is not None and not isinstance(scene, dict):
        raise ValueError(f"{name} field 'scene' must be an object or null, got {type(scene).__name__}")
    if asked is not None and not (isinstance(asked, list) and all(isinstance(item, str) for item in asked)):
        raise ValueError(f"{name} field 'asked' must be a list of attribute names, got {asked!r}")
    return {**output, "image": image, "scene": scene}


def check_regions(regions: Any, where: str) -> list[dict]:
    """The optional ``regions`` field: a list of ``{"box": [x0, y0, x1, y1] in 0–999, "words": {name: word}}``."""
    if not isinstance(regions, list):
        raise ValueError(f"{where}: field 'regions' must be a list, got {type(regions).__name__}")
    for number, region in enumerate(regions):
        box = region.get("box") if isinstance(region, dict) else None
        words = region.get("words") if isinstance(region, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and 0 <= box[0] <= box[2] <= 999 and 0 <= box[1] <= box[3] <= 999):
            raise ValueError(f"{where}: regions[{number}] needs 'box': [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 999 "
                             f"and 0 <= y0 <= y1 <= 999, got {box!r}")
        if not (isinstance(words, dict) and words and all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                          for k, v in words.items())):
            raise ValueError(f"{where}: regions[{number}] needs 'words': a mapping of attribute names to words, "
                             f"got {words!r}")
    return regions


def _parse_images(record: dict, where: str) -> list[str]:
    """The ``image`` field as a list of relative (or absolute) paths; absent means text-only."""
    image = record.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{where}: field 'image' must be a path or a list of paths, got {image!r}")
    return names


def _parse_conversation(record: dict, where: str) -> list[dict]:
    """The ``conversations`` field as ``[{"role", "content"}]``, checked for a trainable turn order."""
    if "conversations" not in record:
        raise ValueError(f"{where}: missing field 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field 'conversations' must be a list, got {type(turns).__name__}")
    if not turns:
        raise ValueError(f"{where}: field 'conversations' is empty")
    conversation = [_parse_turn(turn, number, where) for number, turn in enumerate(turns)]
    check_turn_order(conversation, where)
    return conversation


def _parse_turn(turn: Any, number: int, where: str) -> dict:
    """One ``{"from", "value"}`` turn → ``{"role", "content"}``."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: conversations[{number}] must be an object, got {type(turn).__name__}")
    speaker = turn.get("from")
    if speaker not in ROLES:
        raise ValueError(f"{where}: conversations[{number}] field 'from' is {speaker!r}; "
                         f"expected one of {sorted(ROLES)}")
    content = turn.get("value")
    if not isinstance(content, str):
        raise ValueError(f"{where}: conversations[{number}] field 'value' must be a string, got {content!r}")
    return {"role": ROLES[speaker], "content": content}


def check_turn_order(conversation: list[dict], where: str) -> None:
    """Optional leading system turn, then user/assistant alternating, ending with an assistant turn."""
    turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    if not turns:
        raise ValueError(f"{where}: conversation has no user or assistant turn")
    for number, turn in enumerate(turns):
        expected = "user" if number % 2 == 0 else "assistant"
        if turn["role"] != expected:
            position = number + len(conversation) - len(turns)
            raise ValueError(f"{where}: conversations[{position}] is a {turn['role']!r} turn where a "
                             f"{expected!r} turn was expected (turns must alternate user/assistant, "
                             f"starting with user; system only first)")
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"{where}: conversation ends with a user turn; it needs an assistant answer to train on")
