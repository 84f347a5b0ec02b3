"""User mistakes end in one line naming the field, file or value, and exit 2 — before any model loads.

Each case runs the ``mmbridge`` command in-process with ``MultimodalModel.from_config`` replaced
by a function that fails the test: a recipe error must be found by the preflight check
(``mmbridge/train/preflight.py``), not after the backbones have loaded.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from transformers import AutoTokenizer

from mmbridge.cli import main
from mmbridge.config import RunConfig
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train.preflight import check_run

STAGE = {"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "steps": 2, "precision": "fp32"}


# every numeric field of a recipe out of its range: the error names its dotted path, as an override would
OUT_OF_RANGE = [
    (["stages.0.steps=-4"], "stages.0.steps must be >= 1 (or null), got -4"),
    (["stages.0.steps=0"], "stages.0.steps must be >= 1 (or null), got 0"),
    (["stages.0.epochs=-1"], "stages.0.epochs must be > 0 (or null), got -1"),
    (["stages.0.lr=0"], "stages.0.lr must be > 0, got 0"),
    (["stages.0.lr=.nan"], "stages.0.lr must be a finite number, got nan"),
    (["stages.0.weight_decay=-0.1"], "stages.0.weight_decay must be >= 0, got -0.1"),
    (["stages.0.batch_size=0"], "stages.0.batch_size must be >= 1, got 0"),
    (["stages.0.grad_accum=-2"], "stages.0.grad_accum must be >= 1, got -2"),
    (["stages.0.warmup_ratio=1.5"], "stages.0.warmup_ratio must be in [0, 1], got 1.5"),
    (["stages.0.max_grad_norm=0"], "stages.0.max_grad_norm must be > 0 (or null), got 0"),
    (["stages.0.save_every=0"], "stages.0.save_every must be >= 1 (or null), got 0"),
    (["stages.0.log_every=0"], "stages.0.log_every must be >= 1, got 0"),
    (["stages.0.train.bridge={mode: full, lr: -1e-3}"], "stages.0.train.bridge.lr must be > 0 (or null), got -0.001"),
    (["stages.0.train.llm={mode: partial, layers: 0}"], "stages.0.train.llm.layers must be >= 1 (or null), got 0"),
    (["stages.0.train.llm={mode: lora, r: 0}"], "stages.0.train.llm.r must be >= 1, got 0"),
    (["stages.0.train.llm={mode: lora, alpha: 0}"], "stages.0.train.llm.alpha must be > 0, got 0"),
    (["stages.0.train.llm={mode: lora, dropout: 1.0}"], "stages.0.train.llm.dropout must be in [0, 1), got 1.0"),
    (["data.max_length=0"], "data.max_length must be >= 1 (or null), got 0"),
    (["data.num_workers=-2"], "data.num_workers must be >= 0, got -2"),
    (["data.video_stride=0"], "data.video_stride must be >= 1, got 0"),
    (["data.sources.0.weight=-1"], "data.sources.0.weight must be >= 0, got -1"),
    (["data.sources.0.max_samples=0"], "data.sources.0.max_samples must be >= 1 (or null), got 0"),
    (["data.sources.0.shuffle_buffer=-5"], "data.sources.0.shuffle_buffer must be >= 1 (or null), got -5"),
    (["stages.0.data={sources: [{path: x.json, weight: 2}], num_workers: -1}"],
     "stages.0.data.num_workers must be >= 0, got -1"),
    (["stages.0.data={sources: [{path: x.json, weight: -2}]}"], "stages.0.data.sources.0.weight must be >= 0, got -2"),
    (["seed=-1"], "seed must be >= 0, got -1"),
]


@pytest.fixture()
def recipe(tokenizer_dir, tmp_path) -> str:
    data = write_shape_dataset(str(tmp_path / "shapes"), 4, seed=1)
    model = tiny_model_config(tokenizer_dir, len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1)
    run = RunConfig(model=model, stages=[STAGE], output_dir=str(tmp_path / "run"),
                    data={"sources": [{"path": data}], "max_length": 128})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(run.to_dict()))
    return str(path)


@pytest.fixture()
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the recipe error was reported")

    monkeypatch.setattr(MultimodalModel, "from_config", refuse)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mmbridge {command}: error: "), err
    return err


@pytest.mark.parametrize("overrides, expected", [
    (["stages.0.lr=abc"], "stages.0 ('align'): field 'lr' must be a number, got 'abc'"),
    (["stages.0.batch_size=abc"], "stages.0 ('align'): field 'batch_size' must be an integer, got 'abc'"),
    (["stages.0.lrr=0.1"], "stages.0 ('align'): unknown field(s) ['lrr']"),
    (["stages.0.precision=fp8"], "stages.0 ('align'): precision must be 'bf16' or 'fp32', got 'fp8'"),
    (["stages.0.train.bridge=halfway"], "stages.0 ('align') train.bridge: tuning mode must be one of"),
    (["model.bridge.type=nope"], "recipe model.bridge: unknown bridge 'nope'; known: "),
    (["model.bridge.depth=two"], "field 'depth' must be an integer, got 'two'"),
    (["processor.max_length=-3"], "recipe processor: field 'max_length' must be a positive integer, got -3"),
    (["data.sources.0.path=/nowhere/data.json"], "stages.0 ('align') data.sources.0: data file /nowhere/data.json "
                                                 "does not exist"),
    (["data.sources=[{miniworld: {task: nope, split: train, n: 4}}]"], "unknown MiniWorld task 'nope'; known: "),
    (["data.sources=[{miniworld: {task: caption, split: train, n: many}}]"], "n must be an integer, got 'many'"),
    # a source type's spec is checked by the type that registered it (MiniWorld's check_spec)
    (["data.sources=[{miniworld: {task: caption, split: train, n: 0}}]"], "n must be at least 1"),
    (["data.sources=[{miniworld: {task: caption, split: train, n: 4, seed: -1}}]"], "seed must be >= 0, got -1"),
    (["data.sources.0.weight=heavy"], "data.sources.0: field 'weight' must be a number or 'sqrt', got 'heavy'"),
] + [(overrides, expected) for overrides, expected in OUT_OF_RANGE])
def test_recipe_mistakes(recipe, overrides, expected, capsys, no_model_loading):
    assert main(["train", recipe, *overrides, "--no-progress"]) == 2
    assert expected in _one_line_error(capsys, "train")


def test_bad_json_data_file(recipe, tmp_path, capsys, no_model_loading):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [}')
    assert main(["train", recipe, f"data.sources.0.path={broken}"]) == 2
    assert f"{broken}: invalid JSON" in _one_line_error(capsys, "train")


def test_output_dir_that_is_a_file(recipe, tmp_path, capsys, no_model_loading):
    existing = tmp_path / "a-file"
    existing.write_text("")
    assert main(["train", recipe, f"output_dir={existing}"]) == 2
    assert f"output_dir {existing} is an existing file" in _one_line_error(capsys, "train")
    assert main(["train", recipe, f"output_dir={existing}/run"]) == 2
    assert f"lies under {existing}, which is an existing file" in _one_line_error(capsys, "train")


def test_miniworld_out_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "a-file"
    existing.write_text("")
    assert main(["data", "miniworld", "--task", "caption", "--split", "train", "--n", "2", "--out", str(existing)]) == 2
    assert f"--out {existing} is an existing file" in _one_line_error(capsys, "data")


def test_compare_names_a_file_that_is_not_json(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not json")
    assert main(["eval", "--compare", str(text)]) == 2
    assert f"{text}: not an mmbridge eval results file (not JSON" in _one_line_error(capsys, "eval")


def test_unknown_key_error_is_not_quoted(make_model, tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    make_model().save_pretrained(model_dir)
    assert main(["eval", "--model", model_dir, "--suite", "nope", "--no-progress"]) == 2
    err = _one_line_error(capsys, "eval")
    assert "error: unknown" in err and "error: \"" not in err and "error: '" not in err


def test_check_run_returns_parsed_stages(recipe):
    from mmbridge.config import load_run_config

    stages = check_run(load_run_config(recipe))
    assert [stage.name for stage in stages] == ["align"] and stages[0].lr == 1e-2


def test_a_range_is_checked_before_any_data_or_model_is_read(recipe, capsys, no_model_loading):
    """``stages.0.steps=-4`` trained nothing, saved the untouched model and exited 0; now it stops first, even
    when the data file named next to it does not exist (the data is not read)."""
    assert main(["train", recipe, "stages.0.steps=-4", "data.sources.0.path=/nowhere/data.json"]) == 2
    assert _one_line_error(capsys, "train").endswith("error: stages.0.steps must be >= 1 (or null), got -4")


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_train_refuses_an_out_of_range_stage_before_building_anything(recipe, tmp_path, no_model_loading,
                                                                       as_dataclass):
    from mmbridge.config import load_run_config
    from mmbridge.train import StageConfig, train

    run = load_run_config(recipe)
    stage = {**run.stages[0], "steps": -4}
    run.stages = [StageConfig(**stage) if as_dataclass else stage]
    run.output_dir = str(tmp_path / "never")
    with pytest.raises(ValueError, match=r"^stages\.0\.steps must be >= 1 \(or null\), got -4$"):
        train(run, progress=False)
    assert not os.path.exists(run.output_dir)


def test_every_numeric_recipe_field_has_a_range():
    """A numeric field added to a recipe dataclass without a range fails here."""
    import dataclasses
    import typing

    from mmbridge.train.ranges import RANGES, numeric_fields

    for cls, ranges in RANGES.items():
        assert set(ranges) == numeric_fields(cls), cls.__name__
    hints = {cls: typing.get_type_hints(cls) for cls in RANGES}
    nested = {typing.get_origin(hint) or hint for cls in RANGES for hint in hints[cls].values()}
    assert {cls for cls in nested if dataclasses.is_dataclass(cls)} <= set(RANGES)
