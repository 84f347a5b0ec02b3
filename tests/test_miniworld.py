"""MiniWorld: determinism, splits, held-out pairs, answers checked against the drawn pixels, writing, CLI, streaming."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from mmbridge.cli import main
from mmbridge.data import (DataConfig, ImageTokens, MixtureDataset, Processor, Sample, SampleError, TextSettings,
                           load_llava_json)
from mmbridge.eval.prompts import FORMATS, LETTERS, SHORT, YES_NO
from mmbridge.model.vision import ImageTransform
from mmbridge.testing import shape_image, tiny_tokenizer
from mmbridge.worlds.miniworld import (COLOURS, HELD_OUT_PAIRS, SEEN_PAIRS, SHAPES, SPLITS, TASKS, make_record,
                                       make_sample, write_task)
from mmbridge.worlds.miniworld.geometry import pixel_box
from mmbridge.worlds.miniworld.vocabulary import POPULARITY

COLOUR_TOLERANCE = 40  # an object pixel is within this RGB distance of its palette colour (jitter is <= 10 per channel)
MIN_COMPONENT = 12  # pixels; smaller same-colour specks would be anti-aliasing, not objects


# -- pixel helpers ---------------------------------------------------------------------------------
def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within COLOUR_TOLERANCE of ``colour``'s palette value. ``pixels``: [H, W, 3] uint8."""
    distance = np.linalg.norm(pixels.astype(np.int32) - np.array(COLOURS[colour]), axis=-1)
    return distance < COLOUR_TOLERANCE


def components(mask: np.ndarray) -> list[tuple[int, list[int]]]:
    """4-connected components of ``mask`` as (pixel count, [x0, y0, x1, y1]), by union-find over row runs."""
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (row, first column, last column)

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    previous: list[int] = []
    for row in range(mask.shape[0]):
        padded = np.concatenate([[0], mask[row].astype(np.int8), [0]])
        changes = np.flatnonzero(np.diff(padded))
        current = []
        for start, stop in zip(changes[::2], changes[1::2]):
            node = len(runs)
            runs.append((row, int(start), int(stop) - 1))
            parent.append(node)
            for other in previous:
                if runs[other][1] <= stop - 1 and runs[other][2] >= start:
                    parent[find(other)] = find(node)
            current.append(node)
        previous = current
    grouped: dict[int, list[tuple[int, int, int]]] = {}
    for node, run in enumerate(runs):
        grouped.setdefault(find(node), []).append(run)
    result = []
    for members in grouped.values():
        size = sum(last - first + 1 for _, first, last in members)
        box = [min(m[1] for m in members), min(m[0] for m in members), max(m[2] for m in members),
               max(m[0] for m in members)]
        result.append((size, box))
    return [item for item in result if item[0] >= MIN_COMPONENT]


def nearest_colour(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: np.linalg.norm(pixel.astype(np.int32) - np.array(COLOURS[name])))


def scene_pairs(value) -> list[tuple[str, str]]:
    """Every (colour, shape) named anywhere in a scene description (objects, video tracks, image lists)."""
    if isinstance(value, dict):
        own = [(value["colour"], value["shape"])] if "colour" in value and "shape" in value else []
        return own + [pair for item in value.values() for pair in scene_pairs(item)]
    if isinstance(value, list):
        return [pair for item in value for pair in scene_pairs(item)]
    return []


# -- determinism and splits ------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["attribute", "video", "chart", "text_reading", "multi_image"])
def test_same_arguments_give_identical_samples_and_pixels(task):
    record, images = make_sample(task, "train", 7, seed=3)
    again, images_again = make_sample(task, "train", 7, seed=3)
    assert json.dumps(record, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert len(images) == len(images_again)
    assert all(np.array_equal(np.asarray(first), np.asarray(second)) for first, second in zip(images, images_again))
    other, _ = make_sample(task, "train", 8, seed=3)
    reseeded, _ = make_sample(task, "train", 7, seed=4)
    assert other["scene"] != record["scene"] and reseeded["scene"] != record["scene"]
    assert make_record(task, "train", 7, seed=3) == record  # the record alone needs no rendering


def test_splits_hold_different_scenes():
    scenes = {split: {json.dumps(make_record("attribute", split, index)["scene"], sort_keys=True)
                      for index in range(40)} for split in SPLITS}
    for first in SPLITS:
        for second in SPLITS:
            if first < second:
                assert not scenes[first] & scenes[second], (first, second)


def test_held_out_pairs_never_occur_outside_the_compositional_split():
    phrases = [f"{colour} {shape}" for colour, shape in HELD_OUT_PAIRS]
    for task in TASKS:
        for split in ("train", "val", "test"):
            for index in range(12):
                record = make_record(task, split, index)
                # the scene and any output scene (generation tasks); a caption is text too
                assert not set(scene_pairs(record)) & set(HELD_OUT_PAIRS), (task, split, index)
                text = " ".join([turn["value"] for turn in record.get("conversations", [])]
                                + record.get("texts", [])  # conversations, or a document's texts
                                + [output["caption"] for output in record.get("outputs", [])])
                assert not any(phrase in text for phrase in phrases), (task, split, index, text)


def test_compositional_questions_ask_about_a_held_out_pair():
    for index in range(40):
        record = make_record("attribute", "compositional", index)
        focus = record["scene"]["objects"][0]
        assert (focus["colour"], focus["shape"]) in HELD_OUT_PAIRS
        assert record["answer"] in (focus["colour"], focus["shape"], focus["size"])
    for task in [name for name, task in TASKS.items() if task.compositional]:
        for index in range(6):
            record = make_record(task, "compositional", index)
            shown = record["outputs"][0]["scene"] if task == "image_edit" else record["scene"]  # the edit makes it
            assert set(scene_pairs(shown)) & set(HELD_OUT_PAIRS), (task, index)


@pytest.mark.parametrize("task", ["text_reading", "chart"])
def test_tasks_without_colour_shape_objects_have_no_compositional_split(task):
    with pytest.raises(ValueError, match="no compositional split"):
        make_record(task, "compositional", 0)


def test_unknown_task_or_split_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: caption"):
        make_record("colour", "train", 0)
    with pytest.raises(ValueError, match="compositional"):
        make_record("attribute", "training", 0)


# -- every task: well-formed records ---------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_records_are_well_formed(task):
    for split in ("train", "test"):
        for index in range(4):
            record, images = make_sample(task, split, index)
            assert record["id"] == f"{task}-{split}-{index:06d}" and record["task"] == task
            if "texts" in record:  # an interleaved document: one sentence after each image, no placeholders
                assert record["images"] == record["image"] and len(record["texts"]) == len(images) >= 2
                assert all(text.strip() and "<image>" not in text for text in record["texts"])
                continue
            if record["format"] == "image":  # a generation request: 0 or 1 input image, one output per marker
                human, reply = (turn["value"] for turn in record["conversations"])
                assert human.count("<image>") == len(images) == (1 if "image" in record else 0)
                assert ("image" in record) == (task == "image_edit")
                assert reply == record["answer"] and reply.count("<image_out>") == len(record["outputs"]) == 1
                assert record["question"] in human and reply.endswith("<image_out>")
                assert record["outputs"][0]["caption"].endswith(".") and record["outputs"][0]["scene"]["objects"]
                json.dumps(record)
                continue
            assert record["format"] in FORMATS
            names = [record["image"]] if isinstance(record["image"], str) else record["image"]
            assert len(names) == len(images) >= 1
            human = [turn["value"] for turn in record["conversations"][::2]]
            answers = [turn["value"] for turn in record["conversations"][1::2]]
            assert sum(text.count("<image>") for text in human) == len(images)
            assert human[0].count("<image>") == len(images) and "<image>" not in "".join(answers)
            if record["format"] == "free":
                assert len(record["turns"]) == len(answers) >= 2 and record["answer"] is None
            else:
                assert record["answer"] == answers[0] and record["answer"] in record["answers"]
                assert record["question"] in human[0] and "<image>" not in record["question"]
            json.dumps(record)


# -- answers match the pixels ----------------------------------------------------------------------
def test_object_counts_and_colours_match_the_pixels():
    counted = Counter()  # kinds of counting question checked
    for task, split, index in [(task, split, index) for task in ("counting", "attribute")
                               for split in ("train", "compositional") for index in range(8)]:
        record, (image,) = make_sample(task, split, index)
        pixels = np.asarray(image)
        objects = record["scene"]["objects"]
        expected = Counter(item["colour"] for item in objects)
        for colour in COLOURS:
            assert len(components(colour_mask(pixels, colour))) == expected.get(colour, 0), (task, split, index, colour)
        for item in objects:
            assert nearest_colour(pixels[item["y"], item["x"]]) == item["colour"]
        if task == "counting" and record["question"].startswith(("How many objects", "Count the objects")):
            assert int(record["answer"]) == sum(len(components(colour_mask(pixels, c))) for c in COLOURS)
        if task == "counting":
            counted[_check_count(record["question"], record["answer"], objects, pixels)] += 1
    assert set(counted) == {"all", "colour", "shape", "colour shape"}, counted


def _check_count(question: str, answer: str, objects: list[dict], pixels: np.ndarray) -> str:
    """Check a counting answer: against the pixels where the question names no shape (one blob per object of the
    colour), else against the scene's objects of that shape (whose colours and centres the pixels confirm).
    Returns the kind of question: "all", "colour", "shape" or "colour shape"."""
    words = question.rstrip("?.").split()
    colours = [word for word in words if word in COLOURS]
    shapes = [shape for shape in SHAPES for word in words if word.startswith(shape)]
    kind = " ".join(filter(None, ["colour" * bool(colours), "shape" * bool(shapes)])) or "all"
    assert int(answer) == sum(_mentioned(item, question) for item in objects), (question, answer, objects)
    if not shapes:
        blobs = sum(len(components(colour_mask(pixels, colour))) for colour in (colours or COLOURS))
        assert int(answer) == blobs, (question, answer)
    return kind


def test_colour_answers_match_the_pixel_at_the_object_centre():
    checked = 0
    for index in range(60):
        record, (image,) = make_sample("attribute", "train", index)
        if record["answer"] in COLOURS:
            focus = record["scene"]["objects"][0]
            assert nearest_colour(np.asarray(image)[focus["y"], focus["x"]]) == record["answer"]
            checked += 1
    assert checked >= 10


def test_grounding_box_contains_the_object_pixels():
    for index in range(12):
        record, (image,) = make_sample("grounding", "train", index)
        focus = record["scene"]["objects"][0]
        width, height = image.size
        blobs = [box for _, box in components(colour_mask(np.asarray(image), focus["colour"]))
                 if box[0] <= focus["x"] <= box[2] and box[1] <= focus["y"] <= box[3]]
        assert len(blobs) == 1
        x0, y0, x1, y1 = pixel_box(record["box"], width, height)
        blob = blobs[0]
        assert x0 - 0.5 <= blob[0] and y0 - 0.5 <= blob[1] and blob[2] + 1 <= x1 + 0.5 and blob[3] + 1 <= y1 + 0.5
        assert (x1 - x0) <= (blob[2] - blob[0] + 1) + 0.02 * width  # tight, not just containing


def test_small_objects_are_at_most_three_percent_of_a_large_canvas():
    for index in range(10):
        record, (image,) = make_sample("small_objects", "train", index)
        scene = record["scene"]
        assert min(scene["width"], scene["height"]) >= 896 and image.size == (scene["width"], scene["height"])
        for item in scene["objects"]:
            box = item["box"]
            assert max(box[2] - box[0] + 1, box[3] - box[1] + 1) <= 0.03 * scene["width"]


def test_video_frames_show_the_moving_objects():
    for index in range(6):
        record, frames = make_sample("video", "train", index)
        scene = record["scene"]
        assert 8 <= len(frames) == scene["frames"] <= 16
        for track in scene["tracks"]:
            visible = [(frame, position) for frame, position in enumerate(track["positions"]) if position]
            for frame, (x, y) in visible:
                assert nearest_colour(np.asarray(frames[frame])[y, x]) == track["colour"]
            (first_x, first_y), (last_x, last_y) = visible[0][1], visible[-1][1]
            moved = {"left": first_x > last_x, "right": last_x > first_x, "up": first_y > last_y,
                     "down": last_y > first_y}
            assert moved[track["direction"]]


def test_text_reading_answers_are_the_drawn_texts():
    for index in range(20):
        record = make_record("text_reading", "train", index)
        texts = [item["text"] for item in record["scene"]["texts"]]
        assert all(word in texts for word in record["answer"].split())


# -- POPE and multiple choice ----------------------------------------------------------------------
def test_pope_is_balanced_with_every_negative_type():
    records = [make_record("existence", "train", index) for index in range(60)]
    assert Counter(record["answer"] for record in records) == {"yes": 30, "no": 30}
    assert {record["pope"] for record in records if record["answer"] == "no"} == {"random", "popular", "adversarial"}
    for record in records:
        present = {(item["colour"], item["shape"]) for item in record["scene"]["objects"]}
        asked = tuple(record["question"].split(" in the image")[0].split()[-2:])  # "Is there a red circle …"
        assert (asked in present) == (record["answer"] == "yes")
        if record["answer"] == "no" and record["pope"] == "adversarial":
            assert any(asked[0] == colour or asked[1] == shape for colour, shape in present)
        if record["answer"] == "no" and record["pope"] == "popular":
            absent = sorted((pair for pair in SEEN_PAIRS if pair not in present), key=POPULARITY.get, reverse=True)
            assert asked in absent[:3]


def test_multiple_choice_letter_indexes_the_correct_choice():
    kinds = Counter()
    for index in range(30):
        record = make_record("multiple_choice", "train", index)
        letter = record["answer"]
        assert record["conversations"][1]["value"] == letter
        correct = record["choices"][LETTERS.index(letter)]
        assert record["answers"] == [letter, correct]
        assert len(set(record["choices"])) == len(record["choices"]) >= 2
        question = record["question"].split("\n")[0]  # the options follow on their own lines
        kinds[_check_choice(question, correct, record["choices"], record["scene"]["objects"])] += 1
    assert set(kinds) == {"colour", "shape", "size", "count", "present"}, kinds


def _check_choice(question: str, correct: str, choices: list[str], objects: list[dict]) -> str:
    """Check the correct option of a multiple-choice question against the scene; returns the question's kind."""
    focus = objects[0]
    if question.startswith(("What colour", "What is the colour", "What color")):
        assert correct == focus["colour"], question
        return "colour"
    if question.startswith(("What shape", "What is the shape", "Which shape")):
        assert correct == focus["shape"], question
        return "shape"
    if question.startswith(("What size", "How big")) or "small or large" in question:
        assert correct == focus["size"], question
        return "size"
    if question.startswith(("How many", "Count")):
        assert correct == str(sum(_mentioned(item, question) for item in objects)), (question, objects)
        return "count"
    assert question.startswith("Which of these objects"), f"a question of an unknown kind: {question!r}"
    present = {f"{item['colour']} {item['shape']}" for item in objects}
    assert correct in present and not present & (set(choices) - {correct}), (choices, present)
    return "present"


# -- files, CLI and streaming ----------------------------------------------------------------------
def test_write_task_writes_a_loadable_llava_json(tmp_path):
    path = write_task("multi_image", "val", 4, str(tmp_path), progress=False)
    assert path == os.path.join(str(tmp_path), "multi_image-val.json")
    samples = load_llava_json(path)
    assert len(samples) == 4
    for sample in samples:
        assert len(sample.images) >= 2 and all(os.path.isfile(image) for image in sample.images)
    with open(path) as handle:
        assert json.load(handle)[0]["scene"]["images"]


def test_cli_writes_a_miniworld_split(tmp_path, capsys):
    out = tmp_path / "attribute"
    assert main(["data", "miniworld", "--task", "attribute", "--split", "train", "--n", "5", "--out", str(out),
                 "--no-progress"]) == 0
    samples = load_llava_json(str(out / "attribute-train.json"))
    assert len(samples) == 5 and all(os.path.isfile(sample.images[0]) for sample in samples)
    assert "attribute-train.json" in capsys.readouterr().out
    assert main(["data", "miniworld", "--task", "nope", "--split", "train", "--n", "1", "--out", str(out)]) == 2


def test_cli_writes_jpeg_images(tmp_path):
    """--image-format jpeg: the JSON names .jpg files, which are JPEGs (quality 90) of the same pictures."""
    from PIL import Image

    assert main(["data", "miniworld", "--task", "multi_image", "--split", "val", "--n", "2", "--out",
                 str(tmp_path / "jpeg"), "--image-format", "jpeg", "--no-progress"]) == 0
    png = load_llava_json(write_task("multi_image", "val", 2, str(tmp_path / "png"), progress=False))
    jpeg = load_llava_json(str(tmp_path / "jpeg" / "multi_image-val.json"))
    assert len(png) == len(jpeg) == 2
    for png_sample, jpeg_sample in zip(png, jpeg):
        assert len(jpeg_sample.images) == len(png_sample.images) >= 2
        for png_path, jpeg_path in zip(png_sample.images, jpeg_sample.images):
            assert jpeg_path.endswith(".jpg") and png_path.endswith(".png")
            with Image.open(jpeg_path) as lossy, Image.open(png_path) as lossless:
                assert lossy.format == "JPEG" and lossy.size == lossless.size
                difference = np.abs(np.asarray(lossy, dtype=np.int16)
                                    - np.asarray(lossless.convert("RGB"), dtype=np.int16))
                assert 0 < difference.mean() < 4  # lossy, but the same picture
    with pytest.raises(ValueError, match="image_format must be one of.*'gif'"):
        write_task("attribute", "train", 1, str(tmp_path / "gif"), image_format="gif")


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                     text_settings=TextSettings(max_length=1024))


def test_streamed_source_trains_without_files(processor):
    config = DataConfig(sources=[{"miniworld": {"task": "attribute", "split": "train", "n": 8}},
                                 {"miniworld": {"task": "video", "split": "train", "n": 2, "seed": 1}}])
    dataset = MixtureDataset(config, processor)
    assert len(dataset) == 10 and dataset.source_names == ["miniworld-attribute-train", "miniworld-video-train"]
    example = dataset[0]
    assert example["pixel_values"].shape == (1, 3, 16, 16) and example["source"] == "miniworld-attribute-train"
    assert (example["labels"] != -100).any()
    video = dataset[8]
    frames = make_record("video", "train", 0, seed=1)["scene"]["frames"]
    assert video["pixel_values"].shape == (frames, 3, 16, 16)
    assert len(dataset.lengths()) == 10


def test_streamed_source_spec_is_checked():
    with pytest.raises(ValueError, match="missing"):
        MixtureDataset(DataConfig(sources=[{"miniworld": {"task": "attribute", "n": 8}}]), processor=None)
    with pytest.raises(ValueError, match="exactly one of"):
        DataConfig(sources=[{"path": "a.json", "miniworld": {"task": "attribute", "split": "train", "n": 1}}])


def test_image_loader_must_return_one_image_per_named_image(processor):
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A."}],
                    images=["memory://0"], image_loader=lambda: [shape_image("red", "circle")] * 2)
    with pytest.raises(SampleError, match="image_loader returned 2"):
        processor(sample)
    sample.image_loader = lambda: [shape_image("red", "circle")]
    assert processor(sample)["pixel_values"].shape == (1, 3, 16, 16)


def test_attribute_drill_answers_come_from_the_scene():
    kinds_seen = set()
    for index in range(40):
        record = make_record("attribute_drill", "train", index)
        objects = record["scene"]["objects"]
        colours, shapes = {o["colour"] for o in objects}, {o["shape"] for o in objects}
        sizes = {o["size"] for o in objects}
        pairs = {(o["colour"], o["shape"]) for o in objects}
        turns = record["conversations"]
        assert record["format"] == "free" and turns[0]["value"].startswith("<image>\n")
        existence, counts = [], 0
        for question, answer in zip(turns[0::2], turns[1::2]):
            text, reply = question["value"].replace("<image>\n", "").split("\n")[0], answer["value"]
            if text.startswith("Is there"):
                words = text.split("Is there ")[1].split(" in the image")[0].split()[-2:]
                assert (reply == "yes") == (tuple(words) in pairs), (text, reply, pairs)
                existence.append(reply)
                kinds_seen.add("exists")
            elif text.startswith(("How many", "Count")):
                matching = [o for o in objects if _mentioned(o, text)]
                assert reply == str(len(matching)), (text, reply, objects)
                counts += 1
                kinds_seen.add("count")
            elif "small or large" in text or "size" in text:
                assert reply in sizes
                kinds_seen.add("size")
            elif "colo" in text:
                assert reply in colours
                kinds_seen.add("colour")
            else:
                assert reply in shapes, (text, reply)
                kinds_seen.add("shape")
        assert existence.count("yes") == 1 and existence.count("no") <= 1
        assert counts == 1
    assert kinds_seen == {"exists", "count", "size", "colour", "shape"}


def _mentioned(item: dict, question: str) -> bool:
    """Whether ``item`` is among what a drill's count question counts ("red objects", "circles", "objects")."""
    words = question.rstrip("?.").split()
    colour_ok = item["colour"] in words or not any(word in COLOURS for word in words)
    shape_ok = any(word.startswith(item["shape"]) for word in words) or not any(
        word.startswith(shape) for word in words for shape in SHAPES)
    return colour_ok and shape_ok


@pytest.mark.parametrize("task", ["attribute_drill", "conversation"])
def test_a_conversation_gives_each_format_instruction_once_at_its_first_turn(task):
    """A short-answer or yes/no instruction holds for the rest of the conversation: repeating it on every turn
    was a quarter of a drill's text tokens. The first turn of each format still carries it, as every single
    question (and so every test prompt) does."""
    checked = Counter()  # (format, first turn of it or not) of the turns checked
    for index in range(12):
        record = make_record(task, "train", index)
        seen = set()
        for question, turn in zip(record["conversations"][0::2], record["turns"]):
            instruction = {"short": SHORT, "yesno": YES_NO}.get(turn["format"])
            if instruction:
                assert question["value"].endswith(instruction) == (turn["format"] not in seen), (index, question)
                checked[turn["format"], turn["format"] not in seen] += 1
            seen.add(turn["format"])
    assert set(checked) == {(name, first) for name in ("short", "yesno") for first in (True, False)}, checked
    single = make_record("attribute", "test", 0)["conversations"][0]["value"]
    assert single.endswith(SHORT)
