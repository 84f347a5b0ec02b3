"""Two processes (``accelerate launch``, gloo on the CPU) train like one process with twice the grad_accum.

One module fixture runs a two-stage recipe on tiny models saved to disk: in this process with
``grad_accum`` 2 then 4 (the reference), and as two processes with 1 then 2 — the second stage on
a mix of image and text-only samples with LoRA dropout in the LLM. The two-process run is stopped by
a Ctrl-C that reaches one process only, then resumed with ``mmbridge train --resume``. Two launches
in all, about 45-55 s on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmbridge.config import load_run_config
from mmbridge.testing import tiny_llm_config, tiny_tokenizer, tiny_vision_config, write_shape_dataset
from mmbridge.train import train
from mmbridge.train.checkpoint import TrainState
from mmbridge.train.distributed import check_launch
from mmbridge.train.trainer import check_world_size

WORLD = 2
BATCH = 2
STAGES = [  # grad_accum per process; the reference multiplies it by WORLD
    {"name": "align", "train": {"bridge": "full"}, "lr": 1e-3, "batch_size": BATCH, "precision": "fp32",
     "steps": 2, "grad_accum": 1, "data": "images"},
    {"name": "mixed", "train": {"bridge": "full", "llm": {"mode": "lora", "r": 4}}, "lr": 1e-3, "batch_size": BATCH,
     "precision": "fp32", "steps": 3, "grad_accum": 2, "data": "mixed"},
]
STOP_AT = 4  # global step: a Ctrl-C reaches process 1 only, during this step's callback; both stop after it
# Weights, absolute, in units of one Adam step (lr): the broken launch moved 181 of 2,112 bridge weights by 2·lr.
# Rounding moves a weight by ~1e-7·lr where its gradient is large, but where a gradient is near Adam's eps (1e-8) --
# LoRA A matrices while B is still ~lr -- the update lr·g/(|g| + eps) turns a 1e-7 relative difference in the
# gradient's sum into up to ~1e-3·lr. Measured here: 7.3e-7 (two processes) where the one-process run with 2
# threads instead of 1 differs from itself by 4.9e-7. Losses and gradient norms: relative.
WEIGHT_TOLERANCE, LOSS_TOLERANCE = 3e-3 * STAGES[0]["lr"], 1e-6
LAUNCH_TIMEOUT = 180  # seconds; a launch takes about 20

# the head of a launched script: each process prints, after every step, whether each micro-batch it trained on
# held images (a "BATCHES" line, from a spy on MultimodalModel.forward): the batches the run really used
RECORD_BATCHES = textwrap.dedent("""
    import json, os
    from mmbridge.model.multimodal import MultimodalModel

    micro_images, model_forward = [], MultimodalModel.forward

    def recording_forward(self, *args, **kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        micro_images.append(bool((input_ids == self.image_token_id).any()))
        return model_forward(self, *args, **kwargs)

    MultimodalModel.forward = recording_forward

    def print_batches(record):
        line = {"rank": int(os.environ["RANK"]), "stage": record["stage"], "step": record["global_step"],
                "images": micro_images}
        print("BATCHES " + json.dumps(line) + "\\n", end="", flush=True)
        micro_images.clear()
""")

STOP_SCRIPT = RECORD_BATCHES + textwrap.dedent("""
    import os, signal, sys
    from mmbridge.config import load_run_config
    from mmbridge.train import train
    from mmbridge.train.interrupt import TrainingInterrupted

    def ctrl_c_on_one_process(record):
        print_batches(record)
        if os.environ["RANK"] == "1" and record["global_step"] == {stop}:
            signal.raise_signal(signal.SIGINT)

    try:
        train(load_run_config(sys.argv[1]), progress=False, on_step=ctrl_c_on_one_process)
    except TrainingInterrupted as stopped:
        print("STOPPED", stopped, flush=True)
        sys.exit(130)
    sys.exit("the run was not stopped")
""").format(stop=STOP_AT)


def _tiny_parts(root: str) -> dict:
    """Tokenizer, Llama and CLIP tower saved under ``root``; the recipe's ``model`` section."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    llm_dir, vision_dir = os.path.join(root, "llm"), os.path.join(root, "vision")
    tokenizer = tiny_tokenizer(llm_dir)
    torch.manual_seed(0)
    # a wider init makes the frozen random LLM sensitive to its inputs, so the bridge's gradients are not tiny
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llm_config(len(tokenizer) + 1,
                                                                                  initializer_range=0.2)))
    llm.save_pretrained(llm_dir)
    vision = {key: value for key, value in tiny_vision_config().items() if key != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(vision_dir)
    return {"vision": {"type": "hf", "path": vision_dir, "feature_layer": -2},
            "bridge": {"type": "mlp", "depth": 2, "activation": "gelu"},
            "llm": {"type": "hf", "path": llm_dir}}


def _run_data(root: str) -> dict:
    """The runs' two data sets: 8 shape images, and the same with 8 text-only samples mixed in."""
    images = write_shape_dataset(os.path.join(root, "shapes"), 8, seed=1)
    return {"images": {"sources": [{"path": images}], "max_length": 128},
            "mixed": {"sources": [{"path": images}, {"path": _text_only(root, 8)}], "max_length": 128}}


def _text_only(root: str, count: int) -> str:
    path = os.path.join(root, "text.json")
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    samples = [{"id": f"text-{index}", "conversations": [
        {"from": "human", "value": f"What comes after {words[index % 7]}?"},
        {"from": "gpt", "value": f"{words[index % 7 + 1]}."}]} for index in range(count)]
    with open(path, "w") as handle:
        json.dump(samples, handle)
    return path


def _recipe(root: str, name: str, model: dict, data: dict, factor: int) -> str:
    stages = [{**stage, "grad_accum": stage["grad_accum"] * factor, "data": data[stage["data"]]} for stage in STAGES]
    recipe = {"model": model, "stages": stages, "output_dir": os.path.join(root, name), "seed": 0}
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(*command: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two CPU processes (gloo), one thread each, no GPU even where there is one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    process = subprocess.Popen(launch + list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:  # a hang (as unused parameters under plain DDP): stop the workers too
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the launch hung for {LAUNCH_TIMEOUT} s: {' '.join(command)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("distributed"))
    model, data = _tiny_parts(root), _run_data(root)
    one, two = _recipe(root, "one", model, data, WORLD), _recipe(root, "two", model, data, 1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs
    try:
        reference = train(load_run_config(one), progress=False)
    finally:
        torch.set_num_threads(threads)
    script = os.path.join(root, "stop.py")
    with open(script, "w") as handle:
        handle.write(STOP_SCRIPT)
    stopped = _launch(script, two)
    checkpoints = sorted(os.listdir(os.path.join(root, "two", "checkpoints")))
    stopped_final = os.path.exists(os.path.join(root, "two", "final"))
    resumed = _launch("-m", "mmbridge", "train", two, "--resume", "--no-progress")
    return {"root": root, "reference": reference, "stopped": stopped, "checkpoints": checkpoints,
            "stopped_final": stopped_final, "resumed": resumed, "data": data}


def _log(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_two_processes_train_like_one_with_twice_the_grad_accum(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    root = runs["root"]
    one = load_file(os.path.join(root, "one", "final", "model.safetensors"))
    two = load_file(os.path.join(root, "two", "final", "model.safetensors"))
    assert one.keys() == two.keys()
    trained = [name for name in one if name.startswith("bridge.") or "lora_" in name]
    assert trained and any("lora_" in name for name in trained)
    worst = 0.0
    for name in one:
        if name not in trained:
            assert torch.equal(one[name], two[name]), name  # frozen weights are never touched
        else:
            worst = max(worst, float((one[name] - two[name]).abs().max()))
    print(f"largest difference in a trained weight: {worst:.2e}")
    assert worst < WEIGHT_TOLERANCE

    logged, expected = _log(os.path.join(root, "two", "log.jsonl")), _log(os.path.join(root, "one", "log.jsonl"))
    assert [record["global_step"] for record in logged] == [1, 2, 3, 4, 5]  # one line per step: the main process's
    for mine, theirs in zip(logged, expected):
        assert mine["label_tokens"] == theirs["label_tokens"]  # summed over both processes
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_TOLERANCE)  # the mean over all micro-batches
        # Adam's step hardly depends on the gradient's scale; its norm shows averaged (not summed) gradients
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=LOSS_TOLERANCE)
        samples = BATCH * STAGES[mine["stage_index"]]["grad_accum"] * WORLD
        assert mine["samples_per_s"] * mine["seconds"] == pytest.approx(samples)  # both processes' samples
    assert logged[0]["loss"] == expected[0]["loss"]  # the first step starts from the same weights: the same float
    assert runs["resumed"].stdout.count("done:") == 1


def test_a_step_mixes_a_text_only_micro_batch_with_an_image_one(runs):
    """Process 0's micro-batch holds images while process 1's is text-only (or the reverse) in some step of
    stage 'mixed': DDP must neither hang on the unused vision encoder and bridge nor error. The run above
    finished, so this checks that the data really made such a step: in the batches the stopped launch's
    processes trained on (its "BATCHES" lines, steps 1 and 2 of the stage)."""
    lines = [json.loads(line.split(" ", 1)[1]) for line in runs["stopped"].stdout.splitlines()
             if line.startswith("BATCHES ")]
    mixed_steps = sorted({line["step"] for line in lines if line["stage"] == "mixed"})
    assert mixed_steps == [STOP_AT - 1, STOP_AT], runs["stopped"].stdout[-2000:]
    mixed = 0
    for step in mixed_steps:
        ranks = sorted((line for line in lines if line["step"] == step), key=lambda line: line["rank"])
        assert [line["rank"] for line in ranks] == list(range(WORLD))
        assert all(len(line["images"]) == STAGES[1]["grad_accum"] for line in ranks)  # every micro-batch seen
        mixed += sum(len(set(flags)) == 2 for flags in zip(*(line["images"] for line in ranks)))
    assert mixed >= 1


def test_a_ctrl_c_on_one_process_stops_both_at_one_step_and_resume_finishes(runs):
    stopped = runs["stopped"]
    assert stopped.returncode != 0 and f"stopped at step {STOP_AT - 2} of 3 of stage 'mixed'" in stopped.stdout, \
        stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert stopped.stdout.count("STOPPED") == WORLD  # both processes stopped after the same step
    assert runs["checkpoints"][-1] == f"step-{STOP_AT:08d}" and not runs["stopped_final"]
    state = json.load(open(os.path.join(runs["root"], "two", "checkpoints", f"step-{STOP_AT:08d}", "state.json")))
    assert state["world_size"] == WORLD and len(state["micro"]) == WORLD
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]


def test_a_launch_that_started_one_process_of_several_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(ValueError, match="started only this one.*accelerate launch --multi_gpu"):
        check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's processes
    monkeypatch.setenv("RANK", "0")
    check_launch()


def test_a_mid_stage_checkpoint_resumes_only_on_as_many_processes():
    check_world_size(TrainState(0, 3, 3, world_size=2), 2, "ckpt")
    check_world_size(TrainState(1, 0, 3, world_size=2), 1, "ckpt")  # a stage boundary: any number
    with pytest.raises(ValueError, match="taken mid-stage by a run on 2; resume with 2"):
        check_world_size(TrainState(0, 3, 3, world_size=2), 1, "ckpt")
