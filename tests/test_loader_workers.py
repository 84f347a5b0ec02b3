"""Loader workers (``data.num_workers``): the same micro-batches as in-process, so the same training.

0 and 2 workers give bit-identical losses and weights over two stages (the second's LoRA init draws from
the global RNG after the first stage's workers ran), equal skipped-sample counts and empty micro-batches,
the same losses when a run killed or Ctrl-C'd mid-stage is resumed, a worker's bad sample raised in the
main process naming the sample, and no worker left running after any of it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest
import torch
from transformers import AutoTokenizer

from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, ImageLoadError
from mmbridge.data.loader import MicroBatches
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import train
from mmbridge.train.interrupt import TrainingInterrupted

ALIGN = {"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "precision": "fp32"}
INSTRUCT = {"name": "instruct", "lr": 3e-3, "batch_size": 4, "precision": "fp32",
            "train": {"bridge": "full", "llm": {"mode": "lora", "r": 4, "lr": 1e-2}}}
# 16 samples, 4 micro-batches an epoch: both stages cross an epoch boundary
STAGES = [{**ALIGN, "steps": 3, "grad_accum": 2}, {**INSTRUCT, "steps": 8, "save_every": 1}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_shape_dataset(str(tmp_path_factory.mktemp("shapes")), 16, seed=2)


def _run(tokenizer_dir: str, data_json: str, output: str, workers: int, stages: list[dict] = STAGES,
         **data) -> RunConfig:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    model = tiny_model_config(tokenizer_dir, vocab)
    model["llm"]["hf_config"]["initializer_range"] = 0.2
    return RunConfig(model=model, stages=stages, output_dir=output, seed=0,
                     data={"sources": [{"path": data_json}], "max_length": 128, "num_workers": workers, **data})


def _no_workers_left() -> bool:
    return not multiprocessing.active_children()


@pytest.fixture(scope="module")
def in_process(tokenizer_dir, dataset, tmp_path_factory):
    """The reference: both stages trained with the micro-batches built in the training process."""
    return train(_run(tokenizer_dir, dataset, str(tmp_path_factory.mktemp("in-process")), 0), progress=False)


def _same_training(result, reference) -> None:
    assert [record["loss"] for record in result.history] == [record["loss"] for record in reference.history]
    assert len(result.history) == 11
    expected = reference.model.state_dict()
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_two_workers_train_bit_identically(tokenizer_dir, dataset, tmp_path, in_process):
    workers = train(_run(tokenizer_dir, dataset, str(tmp_path / "w"), 2), progress=False)
    _same_training(workers, in_process)
    assert _no_workers_left()


class _Kill(Exception):
    pass


def test_killed_mid_stage_resumes_exactly_with_workers(tokenizer_dir, dataset, tmp_path, in_process):
    def kill(record: dict) -> None:
        if record["global_step"] == 5:  # step 2 of 8 of the second stage, saved every step
            raise _Kill()

    output = str(tmp_path / "k")
    with pytest.raises(_Kill):
        train(_run(tokenizer_dir, dataset, output, 2), progress=False, on_step=kill)
    assert _no_workers_left()  # the exception stopped the workers
    _same_training(train(_run(tokenizer_dir, dataset, output, 2), resume=True, progress=False), in_process)


def test_ctrl_c_with_workers_stops_saves_and_resumes(tokenizer_dir, dataset, tmp_path, in_process):
    """A terminal's Ctrl-C reaches the workers too. They ignore it (here twice, which would make the inherited
    handler of the training loop raise KeyboardInterrupt and end them) and go on making micro-batches past the
    ones in flight; the main process stops after its step and writes a checkpoint, and a resume (here with
    another worker count, which the recipe check allows) trains on exactly."""
    def ctrl_c(record: dict) -> None:
        if record["global_step"] == 4:  # the first step of the second stage: 4 of its 8 micro-batches in flight
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for _ in range(2):  # apart: two pending SIGINTs would be delivered as one
                for worker in workers:
                    os.kill(worker.pid, signal.SIGINT)
                time.sleep(0.2)
        if record["global_step"] == 9:
            os.kill(os.getpid(), signal.SIGINT)

    output = str(tmp_path / "c")
    with pytest.raises(TrainingInterrupted, match="stopped at step 6 of 8 of stage 'instruct'"):
        train(_run(tokenizer_dir, dataset, output, 2), progress=False, on_step=ctrl_c)
    assert _no_workers_left()
    _same_training(train(_run(tokenizer_dir, dataset, output, 1), resume=True, progress=False), in_process)


def _with_bad_images(dataset: str, tmp_path) -> str:
    samples = json.loads(open(dataset).read())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # a corrupt file
    samples[1]["image"] = str(tmp_path / "broken.png")
    samples[6]["image"] = str(tmp_path / "missing.png")
    for sample in samples:
        sample["image"] = os.path.join(os.path.dirname(dataset), sample["image"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(samples))
    return str(path)


def test_skipped_samples_are_counted_once_over_workers(tokenizer_dir, dataset, tmp_path):
    """batch_size 1: a bad sample is a whole micro-batch passed over. 16 steps read all of epoch 0 (both bad
    samples) and part of epoch 1, so the workers prefetch micro-batches the loop never takes, whose skips
    must not count."""
    bad = _with_bad_images(dataset, tmp_path)
    stages = [{**ALIGN, "steps": 16, "batch_size": 1}]
    runs = {workers: train(_run(tokenizer_dir, bad, str(tmp_path / f"s{workers}"), workers, stages,
                                skip_bad_samples=True, group_by_length=False), progress=False)
            for workers in (0, 2)}
    empty = {workers: sum(record.get("empty_batches", 0) for record in runs[workers].history) for workers in (0, 2)}
    assert runs[0].skipped == runs[2].skipped and sum(runs[0].skipped["align"].values()) == empty[0] >= 2
    assert empty[0] == empty[2]
    assert [record["loss"] for record in runs[2].history] == [record["loss"] for record in runs[0].history]


def test_bad_sample_in_a_worker_raises_in_the_main_process(tokenizer_dir, dataset, tmp_path):
    bad = _with_bad_images(dataset, tmp_path)
    samples = json.loads(open(bad).read())
    files = {samples[1]["id"]: "broken.png", samples[6]["id"]: "missing.png"}
    stages = [{**ALIGN, "steps": 16, "batch_size": 1}]  # the whole epoch: one of the two is met
    run = _run(tokenizer_dir, bad, str(tmp_path / "e"), 2, stages, group_by_length=False)
    with pytest.raises(ImageLoadError) as raised:
        train(run, progress=False)
    error = raised.value
    assert error.sample_id in files and error.reason == "image_load"
    assert f"sample {error.sample_id!r}" in str(error) and files[error.sample_id] in str(error)
    assert any("data loader worker" in note for note in error.__notes__)
    assert _no_workers_left()


def test_feature_cache_stage_with_workers(tokenizer_dir, dataset, tmp_path):
    stages = [{**ALIGN, "steps": 3}]
    runs = [train(_run(tokenizer_dir, dataset, str(tmp_path / f"f{workers}"), workers, stages,
                       feature_cache=str(tmp_path / "cache")), progress=False) for workers in (0, 2)]
    assert [record["loss"] for record in runs[1].history] == [record["loss"] for record in runs[0].history]
    assert torch.equal(runs[1].model.bridge.linear_1.weight, runs[0].model.bridge.linear_1.weight)


class _Counting:
    """Micro-batch ``m`` = ``{"m": m}``; bad micro-batches skip one sample each."""

    def __init__(self) -> None:
        from collections import Counter

        self.dataset = type("Data", (), {"skipped": Counter(), "skipped_samples": []})()
        self.seed, self.batches_per_epoch = 0, 100

    def micro_batch(self, index: int) -> dict | None:
        if index % 3 == 0:
            self.dataset.skipped["image_load"] += 1
            self.dataset.skipped_samples.append((f"s{index}", "image_load"))
            return None
        return {"m": torch.tensor([index])}


def test_stream_order_and_errors():
    data = _Counting()
    with MicroBatches(data, stride=2, num_workers=2) as stream:
        got = [stream.micro_batch(index) for index in range(5, 25, 2)]
        with pytest.raises(RuntimeError, match="micro-batch 30 asked for.*make 25 next"):
            stream.micro_batch(30)
    assert [None if batch is None else int(batch["m"]) for batch in got] == \
        [None if index % 3 == 0 else index for index in range(5, 25, 2)]
    assert data.dataset.skipped == {"image_load": 3} and data.dataset.skipped_samples[0] == ("s9", "image_load")
    assert _no_workers_left()
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0.*-1"):
        DataConfig(sources=[{"path": "a.json"}], num_workers=-1)
