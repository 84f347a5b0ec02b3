"""Interleaved image–text documents (MMC4 fields too), all-text labels, and training on documents."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from conftest import build_with_llm
from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, MixtureDataset
from mmbridge.data.formats import load_interleaved, load_llava_json
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.testing import shape_image, tiny_model_config
from mmbridge.train import train

GATED = {"type": "gated_xattn", "resampler": {"type": "perceiver", "num_latents": 4, "depth": 1, "heads": 4}}


@pytest.fixture()
def documents(tmp_path) -> str:
    """Two documents as JSON Lines, in the two schemas, with 16 px images beside them."""
    for index, (colour, shape) in enumerate([("red", "star"), ("blue", "square"), ("green", "circle")]):
        shape_image(colour, shape, size=16, seed=index).save(tmp_path / f"{index}.png")
    records = [{"id": "plain", "texts": ["A red star.", "Then a blue square.", "The end."],
                "images": ["0.png", "1.png"]},
               {"url": "https://example.org/mmc4", "text_list": ["Intro.", "A green circle."],
                "image_info": [{"image_name": "2.png", "matched_text_index": 1, "matched_sim": 0.3}]}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return str(path)


def test_both_schemas_load_as_chunks_with_images_before_their_text(documents):
    plain, mmc4 = load_interleaved(documents)
    root = os.path.dirname(documents)
    assert plain.id == "plain" and [chunk["text"] for chunk in plain.document] == ["A red star.", "Then a blue square.",
                                                                                   "The end."]
    assert [chunk["image"] for chunk in plain.document] == [os.path.join(root, "0.png"), os.path.join(root, "1.png"),
                                                           None]
    assert mmc4.id == "https://example.org/mmc4" and mmc4.images == [os.path.join(root, "2.png")]
    assert [chunk["image"] is not None for chunk in mmc4.document] == [False, True]


@pytest.mark.parametrize("record, message", [
    ({"texts": []}, "'texts' must be a non-empty list of strings"),
    ({"texts": ["a"], "images": ["x.png", "y.png"]}, "'images' must be a list of at most 1 paths or nulls"),
    ({"text_list": ["a", "b"], "image_info": [{"image_name": "x.png", "matched_text_index": 2}]},
     r"image_info\[0\] needs 'image_name' and a 'matched_text_index' in 0..1"),
    ({"text_list": ["a"], "image_info": [{"image_name": "x.png", "matched_text_index": 0},
                                         {"image_name": "y.png", "matched_text_index": 0}]},
     r"image_info\[1\] matches text 0, which already has an image"),
    ({"texts": [" ", ""]}, "every text is empty; a document needs text to train on"),
])
def test_malformed_documents_name_the_file_record_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "d", **record}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl: document #0 \\(id 'd'\\): {message}"):
        load_interleaved(str(path))


def test_a_source_finds_its_format_from_the_first_record(documents, tokenizer_dir):
    model = build_with_llm(tokenizer_dir, {"type": "mlp"})
    auto = MixtureDataset(DataConfig(sources=[{"path": documents}]), model.processor())
    assert [sample.document is not None for sample in auto.samples] == [True, True]
    with pytest.raises(ValueError, match="format must be one of"):
        DataConfig(sources=[{"path": documents, "format": "mmc4"}])


def test_documents_label_every_text_token_and_no_image_token(documents, tokenizer_dir):
    model = build_with_llm(tokenizer_dir, {"type": "mlp"})
    example = model.processor()(load_interleaved(documents)[0])
    ids, labels = example["input_ids"], example["labels"]
    image = ids == model.image_token_id
    assert int(image.sum()) == 2 * model.tokens_per_image and example["pixel_values"].shape[0] == 2
    assert (labels[image] == IGNORE_INDEX).all()
    assert torch.equal(labels[~image], ids[~image])  # text, newlines and the closing EOS all count
    assert int(ids[-1]) == model.tokenizer.eos_token_id


def test_gated_models_close_each_image_chunk_with_their_chunk_token(documents, tokenizer_dir):
    model = build_with_llm(tokenizer_dir, GATED)
    example = model.processor()(load_interleaved(documents)[0])
    ids = example["input_ids"].tolist()
    chunk = model.bridge.chunk_token_id
    assert ids.count(model.image_token_id) == 2 and ids.count(chunk) == 2  # one <image> token per image
    first_image, first_end = ids.index(model.image_token_id), ids.index(chunk)
    assert model.tokenizer.decode(ids[first_image + 1:first_end]).strip() == "A red star."


def test_all_text_labels_for_conversations(tmp_path, tokenizer_dir):
    shape_image("red", "star", size=16).save(tmp_path / "0.png")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"id": "c", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "Red."}]}]))
    sample = load_llava_json(str(path))[0]
    model = build_with_llm(tokenizer_dir, {"type": "mlp"})
    replies = model.processor()(sample)
    everything = model.processor(label_all=True)(sample)
    assert torch.equal(replies["input_ids"], everything["input_ids"])
    question = model.tokenizer("What colour is the star?", add_special_tokens=False)["input_ids"]
    labelled = [token for token in everything["labels"].tolist() if token != IGNORE_INDEX]
    assert len(labelled) > len([t for t in replies["labels"].tolist() if t != IGNORE_INDEX])
    assert all(token in labelled for token in question)
    assert not (everything["labels"][everything["input_ids"] == model.image_token_id] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="data labels must be one of"):
        DataConfig(sources=[{"path": str(path)}], labels="replies")


@pytest.mark.parametrize("bridge", [GATED, {"type": "mlp"}], ids=["gated_xattn", "mlp"])
def test_training_on_documents_lowers_their_loss(documents, tokenizer_dir, tmp_path, bridge):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    # two documents, batch 2: every step's loss is the whole data set's
    stage = {"name": "docs", "train": {"bridge": "full", "llm": "full"}, "lr": 1e-2, "steps": 6, "batch_size": 2,
             "precision": "fp32", "warmup_ratio": 0.0}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=bridge), stages=[stage],
                    output_dir=str(tmp_path / "run"), data={"sources": [{"path": documents}], "max_length": 256})
    result = train(run, progress=False)
    losses = [record["loss"] for record in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0]


def test_miniworld_documents_stream_and_write_as_interleaved_files(tmp_path, tokenizer_dir):
    from mmbridge.worlds.miniworld import write_task

    model = build_with_llm(tokenizer_dir, GATED)
    streamed = MixtureDataset(DataConfig(sources=[{"miniworld": {"task": "interleaved_document", "split": "train",
                                                                 "n": 3}}]), model.processor())
    path = write_task("interleaved_document", "train", 3, str(tmp_path), progress=False)
    written = MixtureDataset(DataConfig(sources=[{"path": path}]), model.processor())
    assert len(streamed.samples) == len(written.samples) == 3
    for stream_sample, file_sample in zip(streamed.samples, written.samples):
        assert [c["text"] for c in stream_sample.document] == [c["text"] for c in file_sample.document]
    example = streamed[0]
    images = int((example["input_ids"] == model.image_token_id).sum())
    assert images == example["pixel_values"].shape[0] == len(streamed.samples[0].document) >= 2
    assert torch.equal(example["pixel_values"], written[0]["pixel_values"])  # rendered = written PNGs


def test_in_context_examples_come_first_and_only_the_own_reply_is_labelled(tmp_path, tokenizer_dir):
    for index, colour in enumerate(["red", "blue", "green"]):
        shape_image(colour, "star", size=16, seed=index).save(tmp_path / f"{index}.png")

    def record(identifier: str, image: str, answer: str, **extra) -> dict:
        return {"id": identifier, "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": answer}], **extra}

    path = tmp_path / "mimic.json"
    path.write_text(json.dumps([record("a", "0.png", "Red."), record("b", "1.png", "Blue."),
                                record("c", "2.png", "Green.", in_context=["a", "b"]),
                                record("d", "2.png", "Green.", rel_ins_ids=["b"])]))
    samples = {sample.id: sample for sample in load_llava_json(str(path))}
    query = samples["c"]
    assert [turn["content"] for turn in query.conversation if turn["role"] == "assistant"] == ["Red.", "Blue.",
                                                                                             "Green."]
    assert [os.path.basename(image) for image in query.images] == ["0.png", "1.png", "2.png"]
    assert query.context_turns == 4 and samples["d"].context_turns == 2  # MIMIC-IT's field name works too
    model = build_with_llm(tokenizer_dir, {"type": "mlp"})
    example = model.processor(system_prompt="Be brief.")(query)
    labelled = [token for token in example["labels"].tolist() if token != IGNORE_INDEX]
    assert model.tokenizer.decode(labelled).strip().startswith("Green.")  # not Red. or Blue.
    assert int((example["input_ids"] == model.image_token_id).sum()) == 3 * model.tokens_per_image
    path.write_text(json.dumps([record("a", "0.png", "Red.", in_context=["zzz"])]))
    with pytest.raises(ValueError, match=r"sample #0 \(id 'a'\): 'in_context' names unknown id\(s\) \['zzz'\]"):
        load_llava_json(str(path))
    path.write_text(json.dumps([record("a", "0.png", "Red.", in_context=["a"])]))
    with pytest.raises(ValueError, match="'in_context' names the sample itself"):
        load_llava_json(str(path))
