"""FSDP (``distributed: {strategy: fsdp}``): two CPU processes over gloo train like one process.

The recipe and tiny models are those of ``tests/test_distributed.py`` (align: the bridge trains under a
frozen LLM; mixed: bridge + LoRA on image and text-only samples). One module fixture runs

* the reference: this process, ``grad_accum`` 2 then 4, unsharded (DDP's code path on one process);
* launch 1: two FSDP processes with ``grad_accum`` 1 then 2, each reporting after every step what it holds
  (proof of sharding); a Ctrl-C reaches process 1 only at global step 4, mid-stage 'mixed';
* launch 2: resume that run (sharded AdamW state restored from the one-process-format files), then a run
  seeded with the *reference's* stage-boundary checkpoint (unsharded → FSDP);
* in this process: the FSDP run's stage-boundary checkpoint resumed unsharded (FSDP → unsharded).

Two launches in all; about 60-80 s on two busy cores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import textwrap
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmbridge.config import RunConfig, load_run_config
from mmbridge.registry import config_from_dict
from mmbridge.train import train
from mmbridge.train.sharding import shard_stage
from test_distributed import (BATCH, LOSS_TOLERANCE, RECORD_BATCHES, STAGES, WEIGHT_TOLERANCE, WORLD, _launch, _log,
                              _run_data, _tiny_parts)
from test_distributed import test_a_step_mixes_a_text_only_micro_batch_with_an_image_one as _check_mixed_step

STOP_AT = 4  # global step (stage 'mixed', step 2 of 3)
LAYER_WEIGHT = ".layers.0.mlp.gate_proj."  # an LLM decoder layer's weight (its own FSDP unit; LoRA wraps it later)

SHARDED_SCRIPT = RECORD_BATCHES + textwrap.dedent("""
    import json, os, signal, sys
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from mmbridge.config import load_run_config
    from mmbridge.model.multimodal import MultimodalModel
    from mmbridge.train import train
    from mmbridge.train.interrupt import TrainingInterrupted

    run = load_run_config(sys.argv[1])
    rank = int(os.environ["RANK"])
    built, build = [], MultimodalModel.from_config

    def keep(*args, **kwargs):  # the model train() builds (after seeding), kept for the report
        built.append(build(*args, **kwargs))
        return built[-1]

    MultimodalModel.from_config = keep

    def report(record):  # what this process holds during the step
        print_batches(record)
        model = built[0]
        named = dict(model.named_parameters())
        layer = next(p for name, p in named.items()
                     if "{layer}" in name and name.endswith(".weight") and "lora_" not in name)
        print("HOLDS " + json.dumps({{
            "rank": rank, "step": record["global_step"], "loss": record["loss"],
            "sharded": all(isinstance(p, DTensor) for p in named.values()),
            "local": sum(p.to_local().numel() for p in named.values()), "total": sum(p.numel() for p in named.values()),
            "layer_local": layer.to_local().numel(), "layer_total": layer.numel(),
            "layer_units": sum(isinstance(layer, FSDPModule) for layer in model.llm.decoder_layers()),
            "vision_or_bridge_unit": any(isinstance(m, FSDPModule) for key in ("vision", "bridge")
                                         for m in model.get_submodule(key).modules())}}) + "\\n", end="", flush=True)
        if rank == 1 and record["global_step"] == {stop}:
            signal.raise_signal(signal.SIGINT)

    try:
        train(run, progress=False, on_step=report)
    except TrainingInterrupted as stopped:
        plain = not any(isinstance(p, DTensor) for p in built[0].parameters())
        record = json.dumps({{"rank": rank, "plain": plain, "message": str(stopped)}})
        print("STOPPED " + record + "\\n", end="", flush=True)
        sys.exit(130)
    sys.exit("the run was not stopped")
""").format(layer=LAYER_WEIGHT, stop=STOP_AT)

RESUME_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch.distributed.tensor import DTensor
    from mmbridge.config import load_run_config
    from mmbridge.train import train

    for path in sys.argv[1:]:
        result = train(load_run_config(path), resume=True, progress=False)
        parameters = dict(result.model.named_parameters())
        trained = sorted(name for name in parameters if name.startswith("bridge.") or "lora_" in name)
        print("RESUMED " + json.dumps({
            "rank": int(os.environ["RANK"]), "recipe": path,
            "plain": not any(isinstance(p, DTensor) for p in parameters.values()),
            "checksum": sum(float(parameters[name].double().sum()) for name in trained)}) + "\\n", end="", flush=True)

    # a step in which no process reads an image: the bridge gets no gradient (as under DDP), LoRA does
    from mmbridge.data import DataConfig, MixtureDataset, collate
    from mmbridge.train.sharding import FullyShardedStage
    from mmbridge.train.objectives import StageObjective

    model, text = result.model, load_run_config(sys.argv[1]).stages[1]["data"]["sources"][1]["path"]
    processor = model.processor(max_length=128)
    dataset = MixtureDataset(DataConfig(sources=[{"path": text}], max_length=128), processor)
    rank = int(os.environ["RANK"])
    batch = collate([dataset[2 * rank], dataset[2 * rank + 1]], processor.pad_token_id)
    sharded = FullyShardedStage(StageObjective(model), model, torch.device("cpu"), 2, "fp32")
    sharded.root(batch)[0].backward()
    sharded.finish_backward()
    named = dict(model.named_parameters())
    print("TEXT_ONLY " + json.dumps({
        "rank": rank, "bridge_grads": sum(p.grad is not None for n, p in named.items() if n.startswith("bridge.")),
        "lora_grads": sum(p.grad is not None for n, p in named.items() if "lora_" in n),
        "lora": sum("lora_" in n for n in named)}) + "\\n", end="", flush=True)
    sharded.gather()
""")


def _fsdp_recipe(root: str, name: str, model: dict, data: dict, factor: int, strategy: str) -> str:
    stages = [{**stage, "grad_accum": stage["grad_accum"] * factor, "data": data[stage["data"]]} for stage in STAGES]
    recipe = {"model": model, "stages": stages, "output_dir": os.path.join(root, name), "seed": 0,
              "distributed": {"strategy": strategy}}
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    return path


def _lines(output: str, tag: str) -> list[dict]:
    """The JSON records a launch's processes printed under ``tag``; each prints a record in one write (text and
    newline together), so two processes' records never share a line."""
    return [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith(tag + " ")]


def _seed_from(checkpoint: str, output_dir: str) -> None:
    """``output_dir`` holding only ``checkpoint`` (a stage boundary), as if the run had stopped there."""
    shutil.copytree(checkpoint, os.path.join(output_dir, "checkpoints", os.path.basename(checkpoint)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("fsdp"))
    model, data = _tiny_parts(root), _run_data(root)
    one = _fsdp_recipe(root, "one", model, data, WORLD, "ddp")
    two = _fsdp_recipe(root, "two", model, data, 1, "fsdp")
    seeded = _fsdp_recipe(root, "seeded", model, data, 1, "fsdp")
    back = _fsdp_recipe(root, "back", model, data, WORLD, "ddp")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs
    try:
        reference = train(load_run_config(one), progress=False)
        _seed_from(os.path.join(root, "one", "checkpoints", "step-00000002"), os.path.join(root, "seeded"))
        scripts = {}
        for name, text in (("sharded", SHARDED_SCRIPT), ("resume", RESUME_SCRIPT)):
            scripts[name] = os.path.join(root, f"{name}.py")
            with open(scripts[name], "w") as handle:
                handle.write(text)
        stopped = _launch(scripts["sharded"], two)
        checkpoints = sorted(os.listdir(os.path.join(root, "two", "checkpoints")))
        _seed_from(os.path.join(root, "two", "checkpoints", "step-00000002"), os.path.join(root, "back"))
        resumed = _launch(scripts["resume"], two, seeded)
        unsharded = train(load_run_config(back), resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "reference": reference, "stopped": stopped, "checkpoints": checkpoints,
            "resumed": resumed, "unsharded": unsharded, "data": data}


def _worst_trained_difference(root: str, name: str, reference: str = "one") -> float:
    """The largest difference in a trained weight between two runs' final models (frozen ones must be equal)."""
    theirs = load_file(os.path.join(root, reference, "final", "model.safetensors"))
    mine = load_file(os.path.join(root, name, "final", "model.safetensors"))
    assert mine.keys() == theirs.keys()
    worst = 0.0
    for key in theirs:
        if key.startswith("bridge.") or "lora_" in key:
            worst = max(worst, float((mine[key] - theirs[key]).abs().max()))
        else:
            assert torch.equal(mine[key], theirs[key]), key  # frozen weights: gathered back exactly
    return worst


def _same_losses(root: str, name: str, first_step: int = 1) -> None:
    logged = [record for record in _log(os.path.join(root, name, "log.jsonl")) if record["global_step"] >= first_step]
    expected = [record for record in _log(os.path.join(root, "one", "log.jsonl"))
                if record["global_step"] >= first_step]
    assert [record["global_step"] for record in logged] == [record["global_step"] for record in expected]
    for mine, theirs in zip(logged, expected):
        assert mine["label_tokens"] == theirs["label_tokens"]
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_TOLERANCE)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=LOSS_TOLERANCE)
        samples = BATCH * STAGES[mine["stage_index"]]["grad_accum"] * WORLD
        assert mine["samples_per_s"] * mine["seconds"] == pytest.approx(samples)


def test_two_fsdp_processes_train_like_one_with_twice_the_grad_accum(runs):
    """Stopped at step 4 and resumed (sharded AdamW moments restored): the same losses and gradient norms as
    the uninterrupted one-process run to 1e-6 relative, and trained weights within test_distributed's
    tolerance (3e-3·lr; the reduce-scatter sums in another order than one process accumulating)."""
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    worst = _worst_trained_difference(runs["root"], "two")
    print(f"largest difference in a trained weight (FSDP, stopped and resumed): {worst:.2e}")
    assert worst < WEIGHT_TOLERANCE
    _same_losses(runs["root"], "two")
    first = _log(os.path.join(runs["root"], "two", "log.jsonl"))[0]
    assert first["loss"] == _log(os.path.join(runs["root"], "one", "log.jsonl"))[0]["loss"]  # same start: same float
    # every process returns the whole, unsharded model, and the same one
    done = [line for line in _lines(resumed.stdout, "RESUMED") if line["recipe"].endswith("two.yaml")]
    assert sorted(line["rank"] for line in done) == [0, 1] and all(line["plain"] for line in done)
    assert done[0]["checksum"] == done[1]["checksum"]


def test_each_process_holds_only_its_shard(runs):
    stopped = runs["stopped"]
    holds = _lines(stopped.stdout, "HOLDS")
    # a record once landed on the end of the other process's Ctrl-C message, written in two writes then (now one):
    # the launch's own output, both streams, is the evidence to read if a record goes missing again
    assert {(line["rank"], line["step"]) for line in holds} == {(rank, step) for rank in range(WORLD)
                                                              for step in range(1, STOP_AT + 1)}, \
        f"returncode {stopped.returncode}\n{stopped.stdout[-3000:]}\n{stopped.stderr[-3000:]}"
    for step in range(1, STOP_AT + 1):
        ranks = [line for line in holds if line["step"] == step]
        assert all(line["sharded"] for line in ranks)  # every parameter is a DTensor during the stage
        assert sum(line["local"] for line in ranks) == ranks[0]["total"]  # the shards add up to the model, once
        assert all(line["local"] < 0.55 * line["total"] for line in ranks)
        assert [line["layer_local"] * WORLD for line in ranks] == [ranks[0]["layer_total"]] * WORLD  # exactly half
        assert all(line["layer_units"] == 2 and not line["vision_or_bridge_unit"] for line in ranks)
        assert ranks[0]["loss"] == ranks[1]["loss"]  # the logged figures are gathered from both


def test_a_step_mixes_a_text_only_micro_batch_with_an_image_one(runs):
    """The launches above finished (no hang, no error) although in some step of stage 'mixed' one process's
    micro-batch was text-only (vision and bridge unused) and the other's held images."""
    assert runs["stopped"].stdout.count("STOPPED") == WORLD and runs["resumed"].returncode == 0
    _check_mixed_step(runs)


def test_a_ctrl_c_on_one_process_stops_both_and_leaves_them_unsharded(runs):
    stopped = runs["stopped"]
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    lines = _lines(stopped.stdout, "STOPPED")
    assert [line["plain"] for line in lines] == [True] * WORLD, stopped.stderr[-3000:]  # gathered back, both
    assert all(f"stopped at step {STOP_AT - 2} of 3 of stage 'mixed'" in line["message"] for line in lines)
    assert runs["checkpoints"] == ["step-00000002", f"step-{STOP_AT:08d}"]
    # the files are those of a one-process run: the same names, shapes and optimizer slots
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        mine = load_file(os.path.join(runs["root"], "two", "checkpoints", f"step-{STOP_AT:08d}", name))
        theirs = load_file(os.path.join(runs["root"], "one", "checkpoints", "step-00000005", name))
        assert {key: value.shape for key, value in mine.items()} == {key: value.shape for key, value in theirs.items()}


def test_a_stage_boundary_checkpoint_moves_between_fsdp_and_unsharded(runs):
    """The reference's checkpoint after stage 'align' resumed by two FSDP processes, and the FSDP run's resumed
    by one process: stage 'mixed' gives the reference's losses and weights both ways."""
    root = runs["root"]
    seeded = [line for line in _lines(runs["resumed"].stdout, "RESUMED") if line["recipe"].endswith("seeded.yaml")]
    assert len(seeded) == WORLD and all(line["plain"] for line in seeded)
    for name in ("seeded", "back"):
        _same_losses(root, name, first_step=3)
        worst = _worst_trained_difference(root, name)
        print(f"largest difference in a trained weight ({name}): {worst:.2e}")
        assert worst < WEIGHT_TOLERANCE


def test_a_step_no_process_reads_an_image_leaves_the_bridge_without_gradient(runs):
    """Both processes text-only: the root unit reduces zeros for the unused bridge, and the step then drops them
    (grad None), so AdamW leaves the bridge and its moments alone, as DDP and one process do."""
    lines = _lines(runs["resumed"].stdout, "TEXT_ONLY")
    assert sorted(line["rank"] for line in lines) == [0, 1], runs["resumed"].stderr[-3000:]
    for line in lines:
        assert line["bridge_grads"] == 0 and line["lora_grads"] == line["lora"] > 0


def test_fsdp_on_one_process_trains_unsharded(caplog):
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="mmbridge"):
        assert shard_stage("fsdp", torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), accelerator, "fp32") is None
    assert "one process: it trains unsharded" in caplog.text
    assert shard_stage("ddp", torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), accelerator, "fp32") is None


def test_the_strategy_is_checked():
    assert config_from_dict(RunConfig, {"distributed": {"strategy": "fsdp"}}).distributed.strategy == "fsdp"
    with pytest.raises(ValueError, match=r"distributed.strategy must be one of \['ddp', 'fsdp'\], got 'zero3'"):
        config_from_dict(RunConfig, {"distributed": {"strategy": "zero3"}})
    with pytest.raises(ValueError, match="recipe: distributed: unknown field"):
        config_from_dict(RunConfig, {"distributed": {"stratgy": "fsdp"}})
