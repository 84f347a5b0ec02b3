"""Grounding formats (mmbridge.boxes): plain ``[x0, y0, x1, y1]`` and Qwen-VL
``<ref>…</ref><box>(x1,y1),(x2,y2)</box>`` written, found and rewritten; the processor's ``box_format``;
MiniWorld in both formats; eval in either; training on Qwen boxes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_eval_harness import fixed_generate
from test_miniworld import colour_mask, components
from transformers import AutoTokenizer

from mmbridge.boxes import (BOX_INSTRUCTIONS, canonical_box, check_box_format, find_boxes, parse_box, rewrite_boxes,
                            write_box, write_grounded, write_ref)
from mmbridge.cli import main
from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, ImageTokens, Processor, Sample, TextSettings
from mmbridge.eval import harness, metrics, tasks
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.vision import ImageTransform
from mmbridge.testing import tiny_model_config, tiny_tokenizer
from mmbridge.train import train
from mmbridge.train.trainer import stage_processor
from mmbridge.worlds.miniworld import make_record, make_sample
from mmbridge.worlds.miniworld.geometry import pixel_box
from mmbridge.worlds.miniworld.stream import load_samples

EDGES = [[0, 0, 999, 999], [0, 0, 0, 0], [999, 999, 999, 999], [7, 45, 120, 998], [500, 1, 501, 2]]


def random_boxes(count: int, seed: int = 0) -> list[list[int]]:
    generator = random.Random(seed)
    boxes = []
    for _ in range(count):
        x0, x1 = sorted(generator.sample(range(1000), 2))
        y0, y1 = sorted(generator.sample(range(1000), 2))
        boxes.append([x0, y0, x1, y1])
    return boxes


# -- writing, finding, parsing --------------------------------------------------------------------
def test_written_boxes_parse_back_exactly_in_both_formats() -> None:
    for box in EDGES + random_boxes(200):
        for box_format in ("plain", "qwen"):
            text = write_box(box, box_format)
            (found,) = find_boxes(f"The answer: {text}.")
            assert (found.format, list(found.values), parse_box(text)) == (box_format, box, box), text


def test_the_written_forms_and_their_boundaries() -> None:
    assert write_box([0, 5, 120, 999]) == "[000, 005, 120, 999]"
    assert write_box([0, 5, 120, 999], "qwen") == "<box>(0,5),(120,999)</box>"
    assert write_box([0, 0, 1000, 1000], "qwen") == "<box>(0,0),(1000,1000)</box>"
    assert write_box([0.4, 1.6, 998.5, 10], "plain") == "[000, 002, 998, 010]"  # rounded to integers
    with pytest.raises(ValueError, match="outside 0–999"):
        write_box([0, 0, 1000, 10], "plain")
    with pytest.raises(ValueError, match="outside 0–1000"):
        write_box([0, -1, 10, 10], "qwen")
    with pytest.raises(ValueError, match="4 values"):
        write_box([1, 2, 3], "qwen")
    assert write_ref("the red circle", "qwen") == "<ref>the red circle</ref>"
    assert write_ref("the red circle", "plain") == "the red circle"
    assert write_grounded("a cat", [1, 2, 3, 4], "qwen") == "<ref>a cat</ref><box>(1,2),(3,4)</box>"
    assert write_grounded("a cat", [1, 2, 3, 4], "plain") == "a cat [001, 002, 003, 004]"
    # Qwen's 1000 (the far edge) is the one value plain cannot write: it becomes 999 (one thousandth less)
    (edge,) = find_boxes("<box>(0,0),(1000,1000)</box>")
    assert list(edge.values) == [0, 0, 1000, 1000] and edge.canonical == [0, 0, 999, 999]
    assert canonical_box([1000, 999.6, 0.4, 3]) == [999, 999, 0, 3]


@pytest.mark.parametrize("text, box", [
    ("[100, 200, 300, 400]", [100, 200, 300, 400]),
    ("It is at [ 010 ,020,  030 , 040 ] in the image.", [10, 20, 30, 40]),
    ("<ref>the red circle</ref><box>(12,340),(560,999)</box>", [12, 340, 560, 999]),
    ("Sure! The <ref> small star </ref> <box>( 5 , 6 ) , ( 70 ,80 )</box> is there.", [5, 6, 70, 80]),
    ("<box>(1,2),(3,4)</box> then [100, 200, 300, 400]", [1, 2, 3, 4]),  # the first box, whichever format
    ("[1, 2] and [5, 6, 7, 8]", [5, 6, 7, 8]),
    ("[1000, 0, 5, 5]", None), ("[-1, 0, 5, 5]", None), ("[1.5, 2, 3, 4]", None), ("[1, 2, 3]", None),
    ("[1, 2, 3, 4, 5]", None), ("<box>(1001,0),(5,5)</box>", None), ("<box>(1,2)</box>", None),
    ("<box>(x1,y1),(x2,y2)</box>", None), ("no box here", None), ("", None),
])
def test_parse_box_from_noisy_text(text: str, box: list[int] | None) -> None:
    assert parse_box(text) == box


def test_rewriting_round_trips() -> None:
    for box in EDGES + random_boxes(100, seed=1):
        plain = f"Find the cat.\n{BOX_INSTRUCTIONS['plain']} -> {write_box(box)} ok"
        qwen = rewrite_boxes(plain, "qwen")
        assert write_box(box, "qwen") in qwen and BOX_INSTRUCTIONS["qwen"] in qwen and "[" not in qwen
        assert rewrite_boxes(qwen, "plain") == plain  # exact: every canonical value is in 0-999
        assert rewrite_boxes(plain, "plain") == plain and rewrite_boxes(qwen, "qwen") == qwen  # own format kept
    qwen = "<ref>the dog</ref><box>(0,10),(1000,1000)</box> and <ref>a cat</ref>"
    plain = rewrite_boxes(qwen, "plain")
    assert plain == "the dog [000, 010, 999, 999] and a cat"  # 1000 → 999; a lone <ref> keeps its phrase
    assert rewrite_boxes(plain, "qwen") == "the dog <box>(0,10),(999,999)</box> and a cat"
    text = "a list [1, 2, 3] and [0.5, 1, 2, 3] and [1000, 1, 2, 3] stay"
    assert rewrite_boxes(text, "qwen") == text


def test_iou_is_the_same_whichever_format_a_box_is_written_in() -> None:
    golds = random_boxes(50, seed=2)
    predictions = random_boxes(50, seed=3)
    plain = metrics.grounding_metrics([write_box(box) for box in predictions], golds)
    qwen = metrics.grounding_metrics([write_grounded("it", box, "qwen") for box in predictions], golds)
    assert plain == qwen and plain["parse_rate"] == 1.0 and 0.0 < plain["mean_iou"] < 1.0
    assert metrics.box_iou(metrics.parse_box(write_box(golds[0], "qwen")), golds[0]) == 1.0


def test_unknown_formats_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"box_format must be one of \('plain', 'qwen'\), got 'xyxy'"):
        check_box_format("xyxy")
    with pytest.raises(ValueError, match="data box_format"):
        DataConfig(sources=[{"miniworld": {"task": "grounding", "split": "train", "n": 1}}], box_format="cogvlm")
    with pytest.raises(ValueError, match="miniworld source .*box_format"):
        load_samples({"task": "grounding", "split": "train", "n": 1, "box_format": "QWEN"})
    with pytest.raises(ValueError, match="eval box_format"):
        tasks.in_box_format({"answer": "[1, 2, 3, 4]"}, "xywh")


# -- the processor --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("boxes-tokenizer")))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def rendered(processor: Processor, sample: Sample) -> tuple[str, str]:
    """The processed example's whole text and its labelled text."""
    example = processor(sample, images=[])
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    return (processor.tokenizer.decode(ids), processor.tokenizer.decode([token for token in labels if token >= 0]))


def test_processor_rewrites_every_turn_into_the_chosen_format(tokenizer) -> None:
    mixed = Sample(id="mixed", images=[], conversation=[
        {"role": "user", "content": f"Where is the <ref>cat</ref>?\n{BOX_INSTRUCTIONS['qwen']}"},
        {"role": "assistant", "content": "<ref>cat</ref><box>(10,20),(300,1000)</box>"},
        {"role": "user", "content": "What is in [500, 500, 600, 700]?"},
        {"role": "assistant", "content": "A dog at [500, 500, 600, 700]."}])
    plain = Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4))  # the default: plain
    text, replies = rendered(plain, mixed)
    assert "<box>" not in text and "<ref>" not in text
    assert f"Where is the cat?\n{BOX_INSTRUCTIONS['plain']}" in text
    assert "cat [010, 020, 300, 999]" in replies and "A dog at [500, 500, 600, 700]." in replies
    qwen = Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                     text_settings=TextSettings(box_format="qwen"))
    text, replies = rendered(qwen, mixed)
    assert "[" not in text and BOX_INSTRUCTIONS["qwen"] in text
    assert "<ref>cat</ref><box>(10,20),(300,1000)</box>" in replies  # already Qwen: kept exactly
    assert "What is in <box>(500,500),(600,700)</box>?" in text
    assert "A dog at <box>(500,500),(600,700)</box>." in replies
    # plain data under the default is the very same sample: today's examples, unchanged
    untouched = Sample(id="plain", images=[], conversation=mixed.conversation[2:])
    assert plain.in_box_format(untouched) is untouched
    with pytest.raises(ValueError, match="box_format"):
        Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                  text_settings=TextSettings(box_format="xyxy"))


# -- MiniWorld ------------------------------------------------------------------------------------
def test_miniworld_grounding_in_both_formats_is_the_same_sample() -> None:
    for index in range(8):
        plain, plain_images = make_sample("grounding", "train", index)
        qwen, qwen_images = make_sample("grounding", "train", index, box_format="qwen")
        assert plain["scene"] == qwen["scene"] and plain["box"] == qwen["box"]
        assert [image.tobytes() for image in plain_images] == [image.tobytes() for image in qwen_images]
        question, answer = (turn["value"] for turn in qwen["conversations"])
        assert "<ref>" in question and question.endswith(BOX_INSTRUCTIONS["qwen"])
        assert answer.startswith("<ref>") and answer.endswith("</box>") and qwen["answer"] == answer
        assert parse_box(answer) == parse_box(plain["answer"]) == qwen["box"]
        # the Qwen question rewritten to plain is exactly the plain question
        assert rewrite_boxes(question, "plain") == plain["conversations"][0]["value"]
        described = make_record("grounding_describe", "train", index, box_format="qwen")
        assert write_box(described["box"], "qwen") in described["conversations"][0]["value"]


def test_qwen_grounding_boxes_contain_the_object_pixels() -> None:
    for index in range(12):
        record, (image,) = make_sample("grounding", "train", index, box_format="qwen")
        focus = record["scene"]["objects"][0]
        width, height = image.size
        blobs = [box for _, box in components(colour_mask(np.asarray(image), focus["colour"]))
                 if box[0] <= focus["x"] <= box[2] and box[1] <= focus["y"] <= box[3]]
        assert len(blobs) == 1
        x0, y0, x1, y1 = pixel_box(parse_box(record["answer"]), width, height)
        blob = blobs[0]
        assert x0 - 0.5 <= blob[0] and y0 - 0.5 <= blob[1] and blob[2] + 1 <= x1 + 0.5 and blob[3] + 1 <= y1 + 0.5
        assert (x1 - x0) <= (blob[2] - blob[0] + 1) + 0.02 * width


def test_conversation_grounding_turns_follow_the_format() -> None:
    checked = 0
    for index in range(30):
        record = make_record("conversation", "train", index, box_format="qwen")
        replies = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        for turn, reply in zip(record["turns"], replies):
            if turn["format"] == "box":
                assert reply.startswith("<ref>") and parse_box(reply) == turn["box"]
                checked += 1
        assert not any(box.format == "plain" for turn in record["conversations"] for box in find_boxes(turn["value"]))
    assert checked >= 3


def test_streamed_source_and_cli_write_qwen_boxes(tmp_path) -> None:
    (sample,) = load_samples({"task": "grounding", "split": "val", "n": 1, "box_format": "qwen"})
    reply = sample.conversation[1]["content"]
    record = make_record("grounding", "val", 0)
    assert find_boxes(reply)[0].format == "qwen" and parse_box(reply) == record["box"]
    assert [region["box"] for region in sample.regions] == [item["box_999"] for item in record["scene"]["objects"]]
    assert main(["data", "miniworld", "--task", "grounding", "--split", "val", "--n", "2", "--out", str(tmp_path),
                 "--box-format", "qwen", "--no-progress"]) == 0
    written = json.loads((tmp_path / "grounding-val.json").read_text())
    assert [item["answer"] for item in written] == [make_record("grounding", "val", index, box_format="qwen")["answer"]
                                                    for index in range(2)]
    assert all("<box>" in item["answer"] for item in written)


# -- evaluation -----------------------------------------------------------------------------------
def test_a_prediction_in_the_other_format_scores_the_same() -> None:
    plain_gold = make_record("grounding", "test", 0)
    qwen_gold = {key: value for key, value in make_record("grounding", "test", 0, box_format="qwen").items()
                 if key != "box"}  # gold read from the Qwen answer
    box = plain_gold["box"]
    shifted = [box[0] + 5, box[1], box[2] + 5, box[3]]
    for gold in (plain_gold, qwen_gold):
        for answer in (write_box(shifted), write_grounded("it", shifted, "qwen")):
            scores = tasks.score_grounding([gold], [answer])
            assert scores["accuracy"] == 1.0 and scores["mean_iou"] == pytest.approx(metrics.box_iou(shifted, box))
    assert tasks.in_box_format(plain_gold, "plain") is plain_gold
    rewritten = tasks.in_box_format(plain_gold, "qwen")
    assert rewritten["answer"] == write_box(box, "qwen") and rewritten["box"] == box
    assert BOX_INSTRUCTIONS["qwen"] in tasks.user_text(rewritten)


def test_run_suite_asks_in_the_models_format_and_reads_either(make_model, monkeypatch) -> None:
    model = make_model()
    model.processor_settings["box_format"] = "qwen"  # as training with data.box_format qwen saves it
    answer = "<ref>it</ref><box>(100,100),(600,600)</box>"
    monkeypatch.setattr(model, "generate", fixed_generate(model, lambda prompt: answer))
    results = harness.run_suite(model, "miniworld", ["grounding"], n=3, progress=False)
    entry = results["tasks"]["grounding"]
    assert results["settings"]["box_format"] == "qwen" and entry["max_new_tokens"] == {"box": 64}
    assert "<ref>" in entry["prompt_example"] and entry["prompt_example"].endswith(BOX_INSTRUCTIONS["qwen"])
    golds = [sample["box"] for sample, _ in tasks.load_miniworld("grounding", "test", 3, 0)]
    expected = metrics.grounding_metrics([write_box([100, 100, 600, 600])] * 3, golds)
    assert entry["mean_iou"] == pytest.approx(expected["mean_iou"]) and entry["parse_rate"] == 1.0
    # evaluate() on samples from a file: their plain boxes are asked in the model's format too
    pairs = tasks.load_miniworld("grounding", "test", 2, 0)
    asked = harness.evaluate(model, pairs, progress=False)
    assert asked["prompt_example"].endswith(BOX_INSTRUCTIONS["qwen"]) and asked["parse_rate"] == 1.0
    plain = harness.run_suite(model, "miniworld", ["grounding"], n=3, progress=False, box_format="plain")
    assert plain["settings"]["box_format"] == "plain"
    assert plain["tasks"]["grounding"]["prompt_example"].endswith(BOX_INSTRUCTIONS["plain"])
    assert plain["tasks"]["grounding"]["mean_iou"] == pytest.approx(expected["mean_iou"])


# -- training -------------------------------------------------------------------------------------
def test_training_on_qwen_boxes_runs_and_saves_the_format(tokenizer_dir, tmp_path) -> None:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    data = {"sources": [{"miniworld": {"task": "grounding", "split": "train", "n": 8}}], "box_format": "qwen",
            "max_length": 256}
    stage = {"name": "ground", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "precision": "fp32",
             "steps": 2}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab), stages=[stage], output_dir=str(tmp_path / "run"),
                    data=data)
    torch.manual_seed(0)
    result = train(run, progress=False)
    assert len(result.history) == 2 and all(np.isfinite(record["loss"]) for record in result.history)
    # the plain MiniWorld source was rewritten: the model trained on Qwen boxes, and it is saved with the format
    processor = stage_processor(result.model, DataConfig(**data), "ground")
    example = processor(load_samples(data["sources"][0]["miniworld"])[0])
    assert "<box>(" in processor.tokenizer.decode(example["input_ids"]) and processor.box_format == "qwen"
    saved = json.loads((tmp_path / "run" / "final" / "processor.json").read_text())
    assert saved["box_format"] == "qwen"
    assert harness.model_box_format(MultimodalModel.from_pretrained(str(tmp_path / "run" / "final"))) == "qwen"
