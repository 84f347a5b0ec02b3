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
    (["data.sources.0.weight=heavy"], "data.sources.0: field 'weight' must be a number or 'sqrt', got 'heavy'"),
])
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
