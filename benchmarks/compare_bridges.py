"""Equal-budget bridge comparison on MiniWorld: MLP, pooled MLP, Perceiver, Q-Former, Qwen resampler.

    python benchmarks/compare_bridges.py                      # the bundled backbones, table → RESULTS.md
    python benchmarks/compare_bridges.py --bridges mlp qformer --align-n 64 --instruct-n 64 --eval-n 20

Every bridge gets the same training budget — the same samples in the same order, the same
steps, batch size and precision — between the same frozen encoder and frozen LLM (the base
recipe's ``model.vision`` / ``model.llm`` / ``processor``, by default ``configs/demo_miniworld.yaml``):

* ``align``: MiniWorld short captions, only the bridge trains;
* ``instruct``: MiniWorld attribute drills (colour/shape/size, a count, balanced existence),
  only the bridge trains.

The LLM stays frozen in both stages, so differences come from the bridge alone and one blind
baseline (the frozen LLM without the image) serves every row. Each bridge keeps its own
learning rate (``BRIDGES``, set once, not tuned per run). The table reports accuracy per test
task, visual tokens per image, trainable parameters and the median training throughput of each
stage; ``--results`` writes it into ``benchmarks/RESULTS.md`` between markers, with the command
and the machine. A killed comparison resumes: finished bridges are read back from their
``summary.json``, an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from mmbridge.config import RunConfig, load_run_config
from mmbridge.eval.harness import run_suite, save_results
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.utils import atomic_path, atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_RECIPE = os.path.join(ROOT, "configs", "demo_miniworld.yaml")
TASKS = ["attribute", "existence", "counting"]  # attribute brings its compositional split along
MARK_BEGIN, MARK_END = "<!-- compare_bridges: begin -->", "<!-- compare_bridges: end -->"
QUERIES = 36  # equal for the three query-based bridges (a square, as the Qwen resampler's 2D positions need)

# name → (bridge spec, align lr, instruct lr). Token-wise projectors take a higher rate than the
# attention-based resamplers, as in their papers' recipes (LLaVA 1e-3 vs BLIP-2/Qwen-VL 1e-4 scale).
BRIDGES: dict[str, tuple[dict, float, float]] = {
    "mlp": ({"type": "mlp", "depth": 2, "activation": "gelu"}, 3e-3, 1e-3),
    "pooled_mlp": ({"type": "pool", "kernel": 2, "projector": {"type": "mlp", "depth": 2, "activation": "gelu"}},
                   3e-3, 1e-3),
    "perceiver": ({"type": "perceiver", "num_latents": QUERIES, "depth": 2, "heads": 8}, 1e-3, 5e-4),
    "qformer": ({"type": "qformer", "num_queries": QUERIES, "init_from": "minilm"}, 1e-3, 5e-4),
    "qwen_resampler": ({"type": "qwen_resampler", "num_queries": QUERIES, "heads": 8}, 1e-3, 5e-4),
}


def comparison_run(base: RunConfig, name: str, out: str, align_n: int, instruct_n: int,
                   batch_size: int, bridges: dict[str, tuple[dict, float, float]] = BRIDGES) -> RunConfig:
    """The base recipe's backbones and processor with bridge ``name`` and the comparison's two stages."""
    spec, align_lr, instruct_lr = bridges[name]
    model = copy.deepcopy(base.model)
    model["bridge"] = copy.deepcopy(spec)

    def stage(stage_name: str, task: str, n: int, lr: float) -> dict:
        return {"name": stage_name, "data": {"sources": [{"miniworld": {"task": task, "split": "train", "n": n}}]},
                "train": {"bridge": "full"}, "lr": lr, "epochs": 1, "batch_size": batch_size,
                "warmup_ratio": 0.05, "precision": "bf16", "save_every": 25}

    return RunConfig(model=model, processor=copy.deepcopy(base.processor), seed=base.seed,
                     output_dir=os.path.join(out, name),
                     stages=[stage("align", "caption", align_n, align_lr),
                             stage("instruct", "attribute_drill", instruct_n, instruct_lr)])


def median_speed(history: list[dict], stage: str) -> float:
    """Median samples/s over the logged steps of ``stage`` (NaN when none ran in this process)."""
    speeds = [record["samples_per_s"] for record in history if record["stage"] == stage]
    return statistics.median(speeds) if speeds else float("nan")


def compare_one(run: RunConfig, tasks: list[str], eval_n: int, progress: bool = True) -> dict:
    """Train (or resume) one bridge, evaluate it, and return its summary (also written to summary.json)."""
    from mmbridge.train import train

    summary_path = os.path.join(run.output_dir, "summary.json")
    settings = {"run": run.to_dict(), "tasks": tasks, "eval_n": eval_n}
    if os.path.isfile(summary_path):
        return _reuse(summary_path, settings)
    began = time.perf_counter()
    result = train(run, resume=True, progress=progress)
    train_seconds = time.perf_counter() - began
    final = os.path.join(run.output_dir, "final")
    model = MultimodalModel.from_pretrained(final)
    results = run_suite(model, "miniworld", tasks, n=eval_n, progress=progress, model_dir=final)
    save_results(os.path.join(run.output_dir, "eval.json"), results)
    summary = {
        "settings": settings,
        "bridge": run.model["bridge"],
        "visual_tokens": model.tokens_per_image,
        "trainable_parameters": sum(parameter.numel() for parameter in model.bridge.parameters()),
        "samples_per_s": {stage: median_speed(result.history, stage) for stage in ("align", "instruct")},
        "train_seconds": train_seconds,
        "steps": len(result.history),
        "lr": {stage["name"]: stage["lr"] for stage in run.stages},
        "accuracy": {task: entry["accuracy"] for task, entry in results["tasks"].items()},
    }
    atomic_write_json(summary_path, summary)
    return summary


def blind_baseline(run: RunConfig, tasks: list[str], eval_n: int, progress: bool = True) -> dict[str, float]:
    """The frozen LLM's accuracy without the image (one row: the LLM is frozen in every comparison run)."""
    path = os.path.join(os.path.dirname(run.output_dir), "blind.json")
    settings = {"llm": run.model["llm"], "processor": run.processor, "tasks": tasks, "eval_n": eval_n}
    if os.path.isfile(path):
        return _reuse(path, settings)["accuracy"]
    model = MultimodalModel.from_config(run.model, processor_settings=run.processor)
    results = run_suite(model, "miniworld", tasks, n=eval_n, blind=True, progress=progress)
    accuracy = {task: entry["accuracy"] for task, entry in results["tasks"].items()}
    atomic_write_json(path, {"settings": settings, "accuracy": accuracy})
    return accuracy


def _reuse(path: str, settings: dict) -> dict:
    """A finished result written with the same settings; another budget or task list is an error, not a reuse."""
    with open(path) as handle:
        saved = json.load(handle)
    if json.loads(json.dumps(settings)) != saved.get("settings"):
        raise SystemExit(f"{path} was written with other settings (budget, recipe, tasks or n); "
                         f"pass a fresh --out or delete it")
    return saved


def comparison_table(rows: dict[str, dict], blind: dict[str, float]) -> str:
    """Markdown: one row per bridge plus the blind baseline; a column per evaluated task split."""
    tasks = list(blind)
    header = ["bridge", *tasks, "visual tokens / image", "trainable params", "align samples/s",
              "instruct samples/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in rows.items():
        cells = [f"{row['accuracy'][task]:.1%}" for task in tasks]
        speed = row["samples_per_s"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['visual_tokens']} | "
                     f"{row['trainable_parameters']:,} | {speed['align']:.2f} | {speed['instruct']:.2f} |")
    lines.append("| *blind (no image)* | " + " | ".join(f"{blind[task]:.1%}" for task in tasks) + " | 0 | – | – | – |")
    return "\n".join(lines)


def results_section(table: str, command: str, budget: str) -> str:
    """The RESULTS.md section: markers, command, machine, budget, table."""
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d}")
    return "\n".join([MARK_BEGIN, f"Command: `{command}`  ", f"Machine: {machine}  ", f"Budget: {budget}", "",
                      table, MARK_END])


def write_results(path: str, section: str) -> None:
    """Replace the marked section of ``path`` (or append it under a heading if there is none)."""
    text = open(path).read() if os.path.isfile(path) else ""
    pattern = re.compile(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n## Bridge comparison on MiniWorld (equal budget)\n\n" + section + "\n"
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=BASE_RECIPE, help="base recipe: backbones and processor settings")
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=list(BRIDGES))
    parser.add_argument("--align-n", type=int, default=320, help="caption samples (align stage)")
    parser.add_argument("--instruct-n", type=int, default=320, help="attribute-drill samples (instruct stage)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="MiniWorld test tasks")
    parser.add_argument("--eval-n", type=int, default=48, help="test samples per task")
    parser.add_argument("--out", default=os.path.join("runs", "compare_bridges"))
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    base = load_run_config(args.recipe)
    progress = not args.no_progress
    rows = {}
    for name in args.bridges:
        print(f"\n== {name}", flush=True)
        run = comparison_run(base, name, args.out, args.align_n, args.instruct_n, args.batch_size)
        rows[name] = compare_one(run, args.tasks, args.eval_n, progress)
    blind = blind_baseline(run, args.tasks, args.eval_n, progress)
    table = comparison_table(rows, blind)
    print("\n" + table)
    if args.results:
        command = "python benchmarks/compare_bridges.py " + " ".join(argv if argv is not None else sys.argv[1:])
        budget = (f"align {args.align_n} caption samples, instruct {args.instruct_n} attribute-drill samples, "
                  f"batch {args.batch_size}, bf16, bridge only (encoder and LLM frozen); test n={args.eval_n} per "
                  f"task; per-bridge learning rates in `BRIDGES`")
        write_results(args.results, results_section(table, command.strip(), budget))
        print(f"\nwrote the table to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
