"""MiniWorld's high-resolution tasks: small_text (reading at 896–1024 px) and the 'highres' eval suite."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from mmbridge.cli import main
from mmbridge.data import load_llava_json
from mmbridge.eval import harness, tasks
from mmbridge.eval.prompts import SHORT
from mmbridge.worlds.miniworld import TASKS, make_record, make_sample
from mmbridge.worlds.miniworld.fonts import BITMAP_FONT, BITMAP_SIZE
from mmbridge.worlds.miniworld.tasks.reading import SMALL_TEXT_MIN, small_text_sizes
from mmbridge.worlds.miniworld.tasks.small_objects import LARGE_CANVASES
from mmbridge.worlds.miniworld.vocabulary import READING_COLOURS

QUESTIONS = ("What word is written in the image?", "What number is written in the image?",
             "What is written at the top of the image?", "Read all the text in the image from top to bottom.",
             *(f"What is written in {colour}?" for colour in READING_COLOURS))


def test_small_text_is_registered_without_a_compositional_split():
    assert "small_text" in TASKS and not TASKS["small_text"].compositional
    with pytest.raises(ValueError, match="no compositional split"):
        make_record("small_text", "compositional", 0)


def test_small_text_renders_at_896_or_1024_px():
    sides = Counter()
    for index in range(12):
        record, (image,) = make_sample("small_text", "test", index)
        scene = record["scene"]
        assert scene["width"] == scene["height"] in LARGE_CANVASES
        assert image.size == (scene["width"], scene["height"])
        sides[scene["width"]] += 1
    assert set(sides) == set(LARGE_CANVASES)


def test_small_text_is_at_most_three_percent_of_the_side_tall():
    for split in ("train", "test"):
        for index in range(60):
            scene = make_record("small_text", split, index)["scene"]
            side = scene["width"]
            low, high = small_text_sizes(side)
            assert high <= 0.03 * side
            for item in scene["texts"]:
                box = item["box"]
                assert box[3] - box[1] + 1 <= 0.03 * side, (split, index, item)
                assert 0 <= box[0] <= box[2] < side and 0 <= box[1] <= box[3] < side
                if item["font"] == BITMAP_FONT:
                    assert item["font_size"] == BITMAP_SIZE
                else:
                    assert SMALL_TEXT_MIN == low <= item["font_size"] <= high
            for item in scene["objects"]:  # the filler objects are tiny too
                box = item["box"]
                assert max(box[2] - box[0] + 1, box[3] - box[1] + 1) <= 0.03 * side


def test_small_text_text_is_drawn_where_the_scene_says():
    for index in range(8):
        record, (image,) = make_sample("small_text", "train", index)
        pixels = np.asarray(image).astype(np.int32)
        for item in record["scene"]["texts"]:
            x0, y0, x1, y1 = item["box"]
            patch = pixels[y0:y1 + 1, x0:x1 + 1]
            closest = np.linalg.norm(patch - np.array(item["rgb"]), axis=-1).min()
            assert closest < 40, (index, item)  # some pixel in the box is (nearly) the text's colour


def test_small_text_questions_and_answers_are_short_and_read_from_the_scene():
    asked = Counter()
    for index in range(80):
        record = make_record("small_text", "train", index)
        texts = record["scene"]["texts"]
        question, answer = record["question"], record["answer"]
        assert record["format"] == "short" and question in QUESTIONS and record["answers"] == [answer]
        assert record["conversations"][0]["value"] == f"<image>\n{question}\n{SHORT}"
        assert record["conversations"][1]["value"] == answer
        rows = [item["text"] for item in sorted(texts, key=lambda item: item["box"][1])]
        if question.startswith("Read all"):
            kind = "all"
            assert answer == " ".join(rows)
        elif question.startswith("What is written at the top"):
            kind = "top"
            assert answer == rows[0]
        elif question.startswith("What is written in "):
            kind = "colour"
            colour = question.removeprefix("What is written in ").removesuffix("?")
            assert [item["text"] for item in texts if item["colour"] == colour] == [answer]
        else:
            kind = "single"
            assert [item["text"] for item in texts] == [answer]
            assert answer.isdigit() == question.startswith("What number")
        asked[kind] += 1
    assert set(asked) == {"single", "colour", "top", "all"}


def test_small_text_is_deterministic_for_a_seed_and_index():
    record, (image,) = make_sample("small_text", "test", 5, seed=2)
    again, (image_again,) = make_sample("small_text", "test", 5, seed=2)
    assert json.dumps(record, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert np.array_equal(np.asarray(image), np.asarray(image_again))
    assert make_record("small_text", "test", 5, seed=2) == record
    assert make_record("small_text", "test", 6, seed=2)["scene"] != record["scene"]
    assert make_record("small_text", "test", 5, seed=3)["scene"] != record["scene"]


def test_highres_suite_lists_exactly_the_two_tasks_and_loads_samples():
    suite = tasks.get_suite("highres")
    assert suite.name == "highres" and [spec.key for spec in suite.tasks] == ["small_objects", "small_text"]
    assert "small_text" not in [spec.task for spec in tasks.get_suite("miniworld").tasks]
    for spec in suite.tasks:
        pairs = suite.load(spec.task, spec.split, 2, 0)
        assert len(pairs) == 2
        for sample, images in pairs:
            assert sample["task"] == spec.task and sample["id"].startswith(f"{spec.task}-test-")
            assert len(images) == 1 and images[0].size[0] in LARGE_CANVASES
            assert tasks.format_settings(sample["format"]).metric in ("vqa", "pope")


def test_highres_suite_runs(make_model):
    results = harness.run_suite(make_model(), "highres", n=1, progress=False)
    assert results["suite"] == "highres" and list(results["tasks"]) == ["small_objects", "small_text"]
    assert all(entry["n"] == 1 for entry in results["tasks"].values())


def test_cli_writes_small_text_samples(tmp_path, capsys):
    out = tmp_path / "small_text"
    assert main(["data", "miniworld", "--task", "small_text", "--split", "test", "--n", "3", "--out", str(out),
                 "--no-progress"]) == 0
    assert "small_text-test.json" in capsys.readouterr().out
    samples = load_llava_json(str(out / "small_text-test.json"))
    assert len(samples) == 3 and all(os.path.isfile(sample.images[0]) for sample in samples)
    with open(out / "small_text-test.json") as handle:
        records = json.load(handle)
    assert all(record["scene"]["width"] in LARGE_CANVASES for record in records)
    assert records == [make_record("small_text", "test", index) | {"image": record["image"]}
                       for index, record in enumerate(records)]
