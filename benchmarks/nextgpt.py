"""NExT-GPT end to end on the bundled backbones: does the LLM answer with the right image, when it should, and does
it still read images as well as before?

    mmbridge train configs/miniworld_generator.yaml          # the generator (README "A generator that runs here")
    python benchmarks/nextgpt.py --train --results benchmarks/RESULTS.md
    python benchmarks/nextgpt.py --run runs/nextgpt --n 24 --steps 10   # measure a trained run, quickly

``--train`` runs ``mmbridge train configs/nextgpt.yaml`` into ``--run`` (resuming a killed run); the time per stage is
the sum of its logged step times (``log.jsonl``). Then, on MiniWorld's **test** splits (``--n`` samples each, the
same samples for every row):

* **image→text before and after**: exact-match accuracy on ``attribute`` questions of the model as the ``instruct``
  stage left it (``stages/3-instruct``: image→text training only) and of the final model (after ``decode`` and
  ``any``): nothing should be lost;
* **emission**: how often the greedy answer holds a complete run of signal tokens where it should (a ``text_to_image``
  request, an ``image_edit`` instruction) and where it should not (an ``attribute`` question), for both models;
* **text→image and edit accuracy**: each emitted run drawn by the generator and scored on its pixels
  (:func:`~mmbridge.worlds.miniworld.scoring.score_requests`: count, colour, shape, size, position, all; an answer
  without a run fails every check), between two bounds drawn with the same generator, steps, guidance and seeds:
  the **upper** bound conditions it on the generator's own encoding of the true caption (what the output projection
  is trained to reach), the **lower** on *random signal tokens* — the projection of Gaussian states with the
  per-dimension mean and spread of the model's real signal-token states (it says nothing about the request).

Every accuracy comes with its 95% Wilson interval. Figures are written as JSON (``--json``) and, with ``--results``,
as a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

from mmbridge.data.collate import collate, image_inputs
from mmbridge.eval.harness import run_suite
from mmbridge.eval.metrics import wilson_interval
from mmbridge.model.generators import build_generator
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.model.output.render import ImageSettings
from mmbridge.worlds.miniworld import make_record, render_images, score_requests
from mmbridge.worlds.miniworld.generation import ATTRIBUTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "nextgpt.yaml")
BEFORE_STAGE = "3-instruct"
CHECKS = ATTRIBUTES + ("all",)
REQUEST_TASKS = ("text_to_image", "image_edit")
MAX_NEW_TOKENS = 24  # a reply ("Sure, here it is. ") and its run of 4 signal tokens fit in ~12


# -- the run ----------------------------------------------------------------------------------------
def train(run_dir: str, overrides: list[str]) -> None:
    """``mmbridge train configs/nextgpt.yaml`` into ``run_dir`` (resumed when it holds checkpoints)."""
    command = [sys.executable, "-m", "mmbridge", "train", RECIPE, f"output_dir={run_dir}", "--no-progress", *overrides]
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        command.append("--resume")
    subprocess.run(command, check=True)


def stage_times(run_dir: str) -> dict[str, dict[str, float]]:
    """Per stage (in order): its optimizer steps and the sum of their logged seconds."""
    times: dict[str, dict[str, float]] = collections.OrderedDict()
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            entry = times.setdefault(record["stage"], {"steps": 0, "seconds": 0.0})
            entry["steps"] += 1
            entry["seconds"] += record["seconds"]
    return times


def load(directory: str, generator: str | None) -> MultimodalModel:
    """A saved model, its image generator replaced by the pipeline at ``generator`` when given."""
    model = MultimodalModel.from_pretrained(directory).eval()
    if generator:
        model.output.modalities["image"].attach_generator(build_generator({"type": "diffusers", "path": generator}))
    return model


# -- answers ----------------------------------------------------------------------------------------
def requests(task: str, n: int) -> tuple[list[dict], list[list[Any]]]:
    """``n`` test records of ``task`` and each one's input images (none for a text-to-image request)."""
    records = [make_record(task, "test", index) for index in range(n)]
    return records, [render_images(task, "test", index) for index in range(n)]


def answer(model: MultimodalModel, records: list[dict], images: list[list[Any]], settings: ImageSettings | None,
           batch_size: int = 8) -> tuple[list[bool], list[list[Any]]]:
    """Greedy answers to each record's question: whether each holds a complete run of signal tokens, and (with
    ``settings``) the images its runs draw."""
    processor, signal = model.processor(), model.output.modalities["image"]
    emitted, drawn = [], []
    for start in range(0, len(records), batch_size):
        chunk = [(record, pictures) for record, pictures in zip(records[start:start + batch_size],
                                                                  images[start:start + batch_size])]
        examples = [{"id": str(offset), **processor.prompt_inputs(question_of(record), pictures)}
                    for offset, (record, pictures) in enumerate(chunk)]
        batch = collate(examples, processor.pad_token_id, padding_side="left")
        with torch.no_grad():
            result = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=False, return_media=settings is not None,
                                    image_settings=settings, **image_inputs(batch, torch.device("cpu")))
        tokens = result.sequences if settings is not None else result
        emitted += [bool(signal.runs(row[None])) for row in tokens]
        drawn += result.images if settings is not None else [[] for _ in chunk]
    return emitted, drawn


def question_of(record: dict) -> str:
    """The user turn of a one-turn record, its ``<image>`` placeholder kept."""
    return record["conversations"][0]["value"]


# -- bounds -----------------------------------------------------------------------------------------
def upper_bound(model: MultimodalModel, records: list[dict], settings: ImageSettings) -> list[list[Any]]:
    """Each request's target caption through the generator's own text encoder, drawn."""
    generator = model.output.modalities["image"].generator
    captions = [record["outputs"][0]["caption"] for record in records]
    conditioning = generator.encode_text(captions).embeds
    return [[image] for image in draw(generator, conditioning, settings)]


def lower_bound(model: MultimodalModel, records: list[dict], images: list[list[Any]],
                settings: ImageSettings) -> list[list[Any]]:
    """Random signal tokens: Gaussian states with the mean and spread (per dimension) of the model's real
    signal-token states on these requests, through the output projection, drawn."""
    output = model.output.modalities["image"]
    states: list[torch.Tensor] = []
    hook = output.projection.register_forward_hook(lambda module, inputs, result: states.append(inputs[0].detach()))
    try:
        answer(model, records, images, settings=ImageSettings(steps=1, seed=0))  # one step: only the states count
    finally:
        hook.remove()
    if not states:
        raise SystemExit("the model emitted no signal tokens on these requests: no states to draw random ones like")
    real = torch.cat(states).float()  # [runs, S, D]
    mean, spread = real.mean(dim=(0, 1)), real.std(dim=(0, 1))
    noise = torch.randn(len(records), real.shape[1], real.shape[2], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conditioning = output.projection(mean + spread * noise)
    return [[image] for image in draw(output.generator, conditioning, settings)]


def draw(generator: Any, conditioning: torch.Tensor, settings: ImageSettings, batch_size: int = 16) -> list[Any]:
    """Images for ``conditioning`` ``[n, L, W]`` in batches, with ``settings``."""
    images = []
    for start in range(0, conditioning.shape[0], batch_size):
        images += generator.generate(conditioning[start:start + batch_size], steps=settings.steps,
                                     guidance_scale=settings.guidance_scale, seed=settings.seed)
    return images


# -- figures ----------------------------------------------------------------------------------------
def rate(flags: list[bool]) -> dict:
    """The share of true flags with its 95% Wilson interval."""
    return {"correct": sum(flags), "n": len(flags), "accuracy": sum(flags) / max(1, len(flags)),
            "interval": list(wilson_interval(sum(flags), len(flags)))}


def image_to_text(model: MultimodalModel, n: int) -> dict:
    """Exact-match accuracy on ``n`` test ``attribute`` questions."""
    result = run_suite(model, "miniworld", ["attribute"], n=n, progress=False)["tasks"]["attribute"]
    correct = round(result["accuracy"] * result["n"])
    return rate([True] * correct + [False] * (result["n"] - correct))


def measure(run_dir: str, generator: str | None, n: int, settings: ImageSettings) -> dict:
    """Every figure of the module docstring."""
    before = load(os.path.join(run_dir, "stages", BEFORE_STAGE), generator)
    after = load(os.path.join(run_dir, "final"), generator)
    figures: dict[str, Any] = {"image_to_text": {"before": image_to_text(before, n), "after": image_to_text(after, n)}}
    questions = requests("attribute", n)
    emission: dict[str, dict] = {}
    for name, model in (("before", before), ("after", after)):
        emission[name] = {"attribute question: no run": rate([not flag for flag in answer(model, *questions, None)[0]])}
    drawing: dict[str, dict] = {}
    for task in REQUEST_TASKS:
        records, images = requests(task, n)
        emission["before"][f"{task} request: a run"] = rate(answer(before, records, images, None)[0])
        began = time.perf_counter()
        emitted, generated = answer(after, records, images, settings)
        seconds = time.perf_counter() - began
        emission["after"][f"{task} request: a run"] = rate(emitted)
        drawing[task] = {"model": score_requests(generated, records)["attributes"], "seconds_per_request": seconds / n,
                         "upper (true caption)": score_requests(upper_bound(after, records, settings), records)[
                             "attributes"],
                         "lower (random signal tokens)": score_requests(
                             lower_bound(after, records, images, settings), records)["attributes"]}
    figures.update(emission=emission, drawing=drawing)
    return figures


def cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    low, high = entry["interval"]
    return f"{100 * entry['accuracy']:.1f}% [{100 * low:.0f}–{100 * high:.0f}]"


def markdown(figures: dict, times: dict, command: str) -> str:
    """The RESULTS.md section."""
    lines = ["## NExT-GPT end to end (issue 24)", "", f"`{command}` — {figures['machine']}, torch "
             f"{figures['versions']['torch']}, transformers {figures['versions']['transformers']}, diffusers "
             f"{figures['versions']['diffusers']}; n = {figures['n']} test samples per task, images drawn with "
             f"{figures['settings']['steps']} steps, guidance {figures['settings']['guidance_scale']}, seed "
             f"{figures['settings']['seed']}. Accuracy with its 95% Wilson interval.", ""]
    lines += ["| stage | steps | seconds (sum of step times) |", "|---|---:|---:|"]
    lines += [f"| {name} | {entry['steps']} | {entry['seconds']:.0f} |" for name, entry in times.items()]
    lines += ["", "| image→text (`attribute`) | before (`stages/3-instruct`) | after (`final`) |", "|---|---|---|",
              f"| exact match | {cell(figures['image_to_text']['before'])} | "
              f"{cell(figures['image_to_text']['after'])} |",
              "", "| answers as it should (a run of signal tokens, or none) | before | after |", "|---|---|---|"]
    for name in figures["emission"]["after"]:
        lines.append(f"| {name} | {cell(figures['emission']['before'].get(name))} | "
                     f"{cell(figures['emission']['after'][name])} |")
    for task, rows in figures["drawing"].items():
        lines += ["", f"| {task} | " + " | ".join(CHECKS) + " |", "|---|" + "---|" * len(CHECKS)]
        for name in ("lower (random signal tokens)", "model", "upper (true caption)"):
            label = "NExT-GPT model" if name == "model" else name
            lines.append(f"| {label} | " + " | ".join(cell(rows[name].get(check)) for check in CHECKS) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=os.path.join("runs", "nextgpt"), help="the run's output_dir")
    parser.add_argument("--train", action="store_true", help="train configs/nextgpt.yaml into --run first")
    parser.add_argument("--generator", help="draw with this pipeline directory instead of the saved one")
    parser.add_argument("--n", type=int, default=96, help="test samples per task")
    parser.add_argument("--steps", type=int, default=25, help="diffusion steps per image")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--results", help="append the section to this RESULTS.md")
    parser.add_argument("--report", help="only print (and with --results append) the section of this saved --json")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for --train (dotted, as mmbridge train)")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as handle:
            figures = json.load(handle)
        publish(markdown(figures, figures["times"], figures["command"]), args.results)
        return
    if args.train:
        train(args.run, args.overrides)
    settings = ImageSettings(steps=args.steps, guidance_scale=args.guidance, seed=0)
    figures = measure(args.run, args.generator, args.n, settings)
    import diffusers
    import transformers

    figures.update(n=args.n, settings=vars(settings), machine=f"{cpu_name()}, {torch.get_num_threads()} threads",
                   times=stage_times(args.run),
                   versions={"torch": torch.__version__, "transformers": transformers.__version__,
                             "diffusers": diffusers.__version__})
    figures["command"] = "python benchmarks/nextgpt.py " + " ".join(sys.argv[1:])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    publish(markdown(figures, figures["times"], figures["command"]), args.results)


def publish(section: str, results: str | None) -> None:
    """Print the section, and append it to ``results`` when given."""
    print(section)
    if results:
        with open(results, "a") as handle:
            handle.write("\n" + section)


if __name__ == "__main__":
    main()
