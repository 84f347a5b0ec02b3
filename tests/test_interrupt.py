"""Ctrl-C during training: the step finishes, a checkpoint is written, the run resumes as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mmbridge.config import RunConfig
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import train
from mmbridge.train.checkpoint import latest_checkpoint
from mmbridge.train.interrupt import TrainingInterrupted

STAGES = [{"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "steps": 3, "precision": "fp32"},
          {"name": "instruct", "train": {"bridge": "full", "llm": {"mode": "lora", "r": 4}}, "lr": 3e-3,
           "batch_size": 4, "steps": 4, "precision": "fp32"}]


def _run(tokenizer_dir: str, data: str, output: str, stages: list[dict] = STAGES) -> RunConfig:
    model = tiny_model_config(tokenizer_dir, len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1)
    return RunConfig(model=model, stages=stages, output_dir=output, seed=0,
                     data={"sources": [{"path": data}], "max_length": 128})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_shape_dataset(str(tmp_path_factory.mktemp("shapes")), 12, seed=2)


def test_ctrl_c_saves_and_resumes_exactly(tokenizer_dir, data, tmp_path):
    whole = train(_run(tokenizer_dir, data, str(tmp_path / "whole")), progress=False)

    def press_ctrl_c(record: dict) -> None:
        if record["global_step"] == 5:  # step 2 of the second stage
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 2 of 4 of stage 'instruct' \(5 steps in all\)"):
        train(_run(tokenizer_dir, data, str(tmp_path / "stopped")), progress=False, on_step=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert latest_checkpoint(str(tmp_path / "stopped" / "checkpoints")).endswith("00000005")
    resumed = train(_run(tokenizer_dir, data, str(tmp_path / "stopped")), resume=True, progress=False)
    assert [record["loss"] for record in resumed.history] == [record["loss"] for record in whole.history]
    expected = whole.model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in resumed.model.state_dict().items())


def test_cli_ctrl_c_prints_one_line_and_exits_130(tokenizer_dir, data, tmp_path):
    """A real process and a real SIGINT, as a terminal sends it."""
    stages = [{**STAGES[0], "steps": 100000}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_run(tokenizer_dir, data, str(tmp_path / "run"), stages).to_dict()))
    log = tmp_path / "run" / "log.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "mmbridge.cli", "train", str(recipe), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "training did not start within 2 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmbridge train: stopped at step ") and last.endswith("resume with --resume"), err
    assert "Traceback" not in err
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith(f"{steps[-1]:08d}")
