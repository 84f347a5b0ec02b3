"""Mixing: sqrt weights (InstructBLIP), per-source caps (Yi-VL), text-only sources beside image ones, the epoch
interleaving, and ``mmbridge data stats``."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mmbridge.cli import main
from mmbridge.config import RunConfig
from mmbridge.data import (SOURCE_TYPES, DataConfig, ImageTokens, MixtureDataset, Processor, Sample, SourceConfig,
                           SourceType, TextSettings, batch_indices)
from mmbridge.data.mixture import draw_counts, interleave
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.vision import ImageTransform
from mmbridge.testing import data_loss, tiny_model_config, tiny_tokenizer, write_shape_dataset
from mmbridge.train import train


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                     text_settings=TextSettings(max_length=256))


def text_file(directory, count: int, stem: str = "chat") -> str:
    """A ShareGPT-style file: text-only conversations (``from``/``value``, no image field)."""
    records = [{"id": f"{stem}-{index}", "conversations": [
        {"from": "human", "value": f"Say the number {index}."}, {"from": "gpt", "value": f"{index}"},
        {"from": "human", "value": "And twice that?"}, {"from": "gpt", "value": f"{2 * index}"}]}
        for index in range(count)]
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_sqrt_weight_draws_in_proportion_to_the_root_of_the_size(processor, tmp_path):
    sources = [SourceConfig(path=text_file(tmp_path, size, f"s{size}"), weight="sqrt") for size in (100, 25, 4)]
    sources.append(SourceConfig(path=text_file(tmp_path, 10, "plain"), weight=0.5))
    dataset = MixtureDataset(DataConfig(sources=sources), processor)
    # the sqrt sources keep their total, 129 draws, shared as 10 : 5 : 2 → 75.9, 37.9, 15.2 rounded
    assert dataset.draws == [76, 38, 15, 5]
    assert dataset.draws[:3] == [round(129 * math.sqrt(size) / 17) for size in (100, 25, 4)]
    for epoch in range(2):
        counts = dataset.source_counts(dataset.epoch_indices(epoch, seed=3))
        assert counts == {"s100": 76, "s25": 38, "s4": 15, "plain": 5}
    drawn = Counter(dataset.epoch_indices(0, seed=3))
    assert all(drawn[index] in (3, 4) for index in range(125, 129))  # 15 draws of 4: each 3 or 4 times
    assert all(drawn[index] <= 1 for index in range(100))  # 76 of 100: a subset without repeats


def test_sqrt_weight_alone_and_errors():
    sources = [SourceConfig(path="a.json", weight="sqrt"), SourceConfig(path="b.json", weight="sqrt")]
    assert draw_counts(sources, [900, 100]) == [750, 250]  # 1000 * 30/40 and 1000 * 10/40
    assert draw_counts(sources, [0, 0]) == [0, 0]
    with pytest.raises(ValueError, match=r"weight must be a number >= 0 or 'sqrt', got 'log'"):
        SourceConfig(path="a.json", weight="log")
    with pytest.raises(ValueError, match="max_samples must be at least 1"):
        SourceConfig(path="a.json", max_samples=0)


def test_max_samples_caps_each_epoch_with_a_fresh_subset(processor, tmp_path):
    config = DataConfig(sources=[SourceConfig(path=text_file(tmp_path, 20, "big"), max_samples=5),
                                 SourceConfig(path=text_file(tmp_path, 4, "small"), weight=3, max_samples=10),
                                 SourceConfig(path=text_file(tmp_path, 6, "free"))])
    dataset = MixtureDataset(config, processor)
    assert dataset.draws == [5, 10, 6]
    subsets = set()
    for epoch in range(6):
        indices = dataset.epoch_indices(epoch, seed=0)
        assert dataset.source_counts(indices) == {"big": 5, "small": 10, "free": 6}
        big = [index for index in indices if index < 20]
        assert len(set(big)) == 5  # without replacement
        subsets.add(tuple(sorted(big)))
        small = Counter(index for index in indices if 20 <= index < 24)
        assert sorted(small.values()) == [2, 2, 3, 3]  # 10 of 3 × 4: two whole passes and half of a third
    assert len(subsets) >= 5  # a fresh subset (nearly) every epoch


def test_epoch_order_is_a_uniform_interleaving(processor, tmp_path):
    config = DataConfig(sources=[SourceConfig(path=text_file(tmp_path, 30, "a")),
                                 SourceConfig(path=text_file(tmp_path, 30, "b"))])
    dataset = MixtureDataset(config, processor)
    first = dataset.epoch_indices(0, seed=1)
    assert first == dataset.epoch_indices(0, seed=1) and sorted(first) == list(range(60))
    assert first != dataset.epoch_indices(1, seed=1) and first != dataset.epoch_indices(0, seed=2)
    # over many epochs, the a-samples' share of the first half is about a half and each index leads equally
    shares = [sum(index < 30 for index in dataset.epoch_indices(epoch, seed=1)[:30]) / 30 for epoch in range(200)]
    assert 0.45 < float(np.mean(shares)) < 0.55
    leaders = Counter(dataset.epoch_indices(epoch, seed=1)[0] for epoch in range(600))
    assert len(leaders) > 50


def test_interleave_keeps_each_source_order():
    orders = [np.array([5, 3, 9]), np.array([100, 101]), np.array([7])]
    merged = interleave(orders, np.random.default_rng(0))
    assert sorted(merged) == [3, 5, 7, 9, 100, 101]
    assert [index for index in merged if index in (5, 3, 9)] == [5, 3, 9]
    assert [index for index in merged if index >= 100] == [100, 101]


def test_sharegpt_format_loads_text_only_conversations(processor, tmp_path):
    dataset = MixtureDataset(DataConfig(sources=[{"path": text_file(tmp_path, 3), "format": "sharegpt"}]), processor)
    example = dataset[2]
    assert example["source"] == "chat" and example["pixel_values"].shape[0] == 0  # no image
    assert [turn["role"] for turn in dataset.samples[2].conversation] == ["user", "assistant"] * 2


def test_text_only_and_image_sources_train_in_one_batch(tokenizer_dir, tmp_path, monkeypatch):
    images = write_shape_dataset(str(tmp_path / "shapes"), 8, seed=2)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    data = {"sources": [{"path": images}, {"path": text_file(tmp_path, 8), "format": "sharegpt"}], "max_length": 128,
            "group_by_length": False}  # length grouping would batch the (longer) image samples together
    stage = {"name": "mix", "train": {"bridge": "full", "llm": "full"}, "lr": 3e-3, "batch_size": 4, "steps": 6,
             "precision": "fp32"}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab), stages=[stage], output_dir=str(tmp_path / "run"),
                    data=data)
    torch.manual_seed(run.seed)  # the model train() would build
    model = MultimodalModel.from_config(run.model, processor_settings=run.processor)
    kinds = {"images": {"sources": data["sources"][:1]}, "text": {"sources": data["sources"][1:]}}
    before = {kind: data_loss(model, {**spec, "max_length": 128}) for kind, spec in kinds.items()}
    trained_rows = []  # per micro-batch the run trained on: which rows hold image tokens
    forward = model.forward

    def recording_forward(*args, **kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        trained_rows.append({bool(row.any()) for row in input_ids == model.image_token_id})
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    result = train(run, progress=False, model=model)
    monkeypatch.setattr(model, "forward", forward)
    losses = [record["loss"] for record in result.history]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    # both kinds learnt, on the whole of each source (not per-step losses of different batches)
    after = {kind: data_loss(result.model, {**spec, "max_length": 128}) for kind, spec in kinds.items()}
    assert all(after[kind] < before[kind] - 0.25 for kind in kinds), (before, after)  # measured: 0.53 for both
    # the batches that trained mixed both kinds: as the run drew them (6 steps of one micro-batch each)
    assert len(trained_rows) == 6 and {True, False} in trained_rows


def write_recipe(tmp_path, data: dict, stages: list[dict]) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"llm": {"type": "hf"}}, "data": data, "stages": stages}))
    return str(path)


def test_data_stats_prints_draws_per_source_without_loading_images(tmp_path, capsys, monkeypatch):
    from mmbridge.data.formats.webdataset import ShardImage
    from mmbridge.worlds.miniworld import writer

    shards = writer.write_webdataset("caption", "train", 12, str(tmp_path / "shards"), shard_size=5, progress=False)
    assert len(shards) == 3

    def no_images(*args, **kwargs):
        raise AssertionError("data stats opened an image")

    monkeypatch.setattr(ShardImage, "__call__", no_images)  # a shard's image member read
    monkeypatch.setattr("mmbridge.worlds.miniworld.sample.render_image", no_images)  # a MiniWorld image drawn
    monkeypatch.setattr("mmbridge.data.images._open_image", no_images)  # an image file opened
    data = {"sources": [{"path": text_file(tmp_path, 49), "format": "sharegpt", "weight": "sqrt"},
                        {"webdataset": str(tmp_path / "shards" / "caption-train-{00000..00002}.tar"),
                         "weight": "sqrt", "name": "captions"},
                        {"miniworld": {"task": "counting", "split": "train", "n": 40}, "weight": 2,
                         "max_samples": 50}]}
    recipe = write_recipe(tmp_path, data, [{"name": "one", "lr": 0.1},
                                           {"name": "two", "lr": 0.1, "data": {"sources": [data["sources"][0]]}}])
    assert main(["data", "stats", recipe]) == 0
    out = capsys.readouterr().out
    # sqrt: 61 draws shared 7 : √12; counting: 2 × 40 = 80, capped at 50
    first = round(61 * 7 / (7 + math.sqrt(12)))
    assert first == 41
    assert "stage 0 ('one'): 111 samples per epoch from 3 source(s)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("chat", "captions", "mini"))}
    chat = next(line.split() for line in out.splitlines() if line.startswith("chat"))  # stage 0's row (the first)
    assert chat[-5:] == ["49", "sqrt", "-", str(first), f"{100 * first / 111:.1f}%"]
    assert rows["captions"][-5:] == ["12", "sqrt", "-", "20", "18.0%"]
    assert rows["miniworld-counting-train"][-5:] == ["40", "2", "50", "50", "45.0%"]
    assert "webdataset (3 shards)" in out
    assert "stage 1 ('two'): 49 samples per epoch from 1 source(s)" in out
    assert main(["data", "stats", recipe, "data.sources.2.max_samples=10"]) == 0
    assert "stage 0 ('one'): 71 samples per epoch" in capsys.readouterr().out


def test_data_stats_names_a_missing_file(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"sources": [{"path": str(tmp_path / "nowhere.json")}]}, [{"name": "a", "lr": 1}])
    assert main(["data", "stats", recipe]) == 2
    assert "nowhere.json" in capsys.readouterr().err


@pytest.fixture
def counted_lines():
    """A source type of the test's own, ``{lines: {n}}``: n text-only samples, registered for one test."""
    def load(spec: dict, name: str) -> list[Sample]:
        return [Sample(f"{name}-{index}", [{"role": "user", "content": f"Line {index}?"},
                                           {"role": "assistant", "content": f"{index}"}], source=name)
                for index in range(spec["n"])]

    def check(spec: dict) -> None:
        if not isinstance(spec.get("n"), int) or spec["n"] < 1:
            raise ValueError(f"lines source {spec}: n must be a positive integer")

    SOURCE_TYPES.add("lines", SourceType(load=load, check=check, stem=lambda spec: f"lines-{spec['n']}"))
    yield
    SOURCE_TYPES.remove("lines")


def test_a_registered_source_type_is_a_recipe_key(tmp_path, counted_lines):
    from mmbridge.data.stats import mixture_stats
    from mmbridge.train.preflight import check_source

    config = DataConfig(sources=[{"lines": {"n": 3}, "weight": 2}, {"path": text_file(tmp_path, 4)}])
    source = config.sources[0]
    assert (source.type, source.spec, source.stem, source.miniworld) == ("lines", {"n": 3}, "lines-3", None)
    dataset = MixtureDataset(config, processor=None)
    assert dataset.source_names == ["lines-3", "chat"] and dataset.draws == [6, 4]
    assert [sample.id for sample in dataset.samples[:3]] == ["lines-3-0", "lines-3-1", "lines-3-2"]
    assert [(row.kind, row.size, row.draws) for row in mixture_stats(config)] == [("lines", 3, 6), ("auto", 4, 4)]
    check_source(source, "data.sources.0")
    with pytest.raises(ValueError, match=r"^data.sources.0: lines source \{'n': 0\}: n must be a positive"):
        check_source(SourceConfig.from_dict({"lines": {"n": 0}}), "data.sources.0")


def test_a_source_names_one_kind_and_unknown_keys_list_the_source_types(counted_lines):
    with pytest.raises(ValueError, match=r"exactly one of .* \(lines, miniworld, .*got lines, miniworld"):
        DataConfig(sources=[{"lines": {"n": 1}, "miniworld": {"task": "caption", "split": "train", "n": 1}}])
    with pytest.raises(ValueError, match=r"source #0: unknown field\(s\) \['line'\].*source type: lines, miniworld"):
        DataConfig(sources=[{"line": {"n": 1}}])
    with pytest.raises(ValueError, match="known source types: lines, miniworld"):
        SourceConfig(type="lyrics", spec={})
    only_path = DataConfig(sources=[{"path": "a.json", "lines": None}]).sources[0]  # a null type key is absent
    assert (only_path.path, only_path.type) == ("a.json", None)
