"""Equal-budget comparison of high-resolution strategies on MiniWorld's 896–1024 px tasks.

    python benchmarks/compare_highres.py --results benchmarks/RESULTS.md
    python benchmarks/compare_highres.py --strategies base anyres --align-n 32 --instruct-n 32 --eval-n 8

Every strategy is the ``model`` of its recipe in ``configs/`` on the bundled backbones (EfficientNet-Lite0 and
SmolLM2-135M-Instruct; Fuyu/OtterHD has no encoder), and every one gets the same budget — the same samples in
the same order, steps, batch size and precision:

* ``align``: MiniWorld short captions, the bridge trains (and what the recipe's align stage trains besides:
  Monkey's per-tile LoRA);
* ``instruct``: MiniWorld ``small_objects`` and ``small_text`` (tiny objects and text on 896–1024 px canvases) in
  equal shares, with what the recipe's instruct stage trains, except the LLM, which stays frozen everywhere (the
  differences come from what reaches it).

The table (written into ``benchmarks/RESULTS.md`` with ``--results``) reports accuracy on the ``highres`` suite's
test splits, the LLM positions one 896×896 image takes, the encoder FLOPs of that image, the trainable
parameters and the median training throughput. Finished strategies are read back from their ``summary.json``,
an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_bridges import (blind_baseline, compare_one, comparison_table, results_section,  # noqa: E402
                             write_results)

from mmbridge.config import RunConfig, load_run_config  # noqa: E402
from mmbridge.model.highres.compute import format_flops, image_cost  # noqa: E402
from mmbridge.model.multimodal import MultimodalModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {  # name → the recipe whose model (and stage training modes) the strategy uses
    "base": "demo_miniworld.yaml",
    "anyres": "llava_next_anyres.yaml",
    "uhd": "llava_uhd.yaml",
    "monkey": "monkey.yaml",
    "fuyu": "otterhd_fuyu.yaml",
}
TASKS = ["small_objects", "small_text"]
REFERENCE_SIZE = (896, 896)  # the smaller of the two canvases the tasks draw


def recipe(name: str) -> RunConfig:
    return load_run_config(os.path.join(ROOT, "configs", STRATEGIES[name]))


def comparison_run(name: str, out: str, align_n: int, instruct_n: int, batch_size: int) -> RunConfig:
    """Strategy ``name``'s model with the comparison's two stages; each stage trains what the recipe's stage of
    that name trains, without the LLM, at the recipe's learning rate."""
    base = recipe(name)
    by_name = {stage["name"]: stage for stage in base.stages}

    def stage(stage_name: str, tasks: dict[str, int]) -> dict:
        own = by_name.get(stage_name, by_name.get("instruct", base.stages[-1]))
        train = {key: copy.deepcopy(mode) for key, mode in own["train"].items() if key != "llm"}
        sources = [{"miniworld": {"task": task, "split": "train", "n": n}} for task, n in tasks.items()]
        return {"name": stage_name, "data": {"sources": sources}, "train": train, "lr": float(own["lr"]),
                "epochs": 1, "batch_size": batch_size, "warmup_ratio": 0.05, "precision": "bf16", "save_every": 25}

    share = max(1, instruct_n // len(TASKS))
    return RunConfig(model=copy.deepcopy(base.model), processor=copy.deepcopy(base.processor), seed=base.seed,
                     output_dir=os.path.join(out, name),
                     stages=[stage("align", {"caption": align_n}), stage("instruct", {task: share for task in TASKS})])


def encoder_cost(run: RunConfig) -> str:
    """Encoder FLOPs of one :data:`REFERENCE_SIZE` image for the run's model (computed on its final weights'
    architecture; FLOPs do not depend on the weights)."""
    model = MultimodalModel.from_pretrained(os.path.join(run.output_dir, "final"))
    cost = image_cost(model.vision, model.bridge, model.highres, REFERENCE_SIZE)
    return f"{format_flops(cost.encoder_flops)} ({cost.crops} crop{'s' if cost.crops > 1 else ''})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--align-n", type=int, default=160, help="caption samples (align stage)")
    parser.add_argument("--instruct-n", type=int, default=480, help="small_objects + small_text samples, equal shares")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-n", type=int, default=48, help="test samples per task")
    parser.add_argument("--out", default=os.path.join("runs", "compare_highres"))
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    progress = not args.no_progress
    runs = {name: comparison_run(name, args.out, args.align_n, args.instruct_n, args.batch_size)
            for name in args.strategies}
    blind = blind_baseline(next(iter(runs.values())), TASKS, args.eval_n, progress, suite="highres")
    rows = {}
    for name, run in runs.items():
        print(f"\n== {name}", flush=True)
        rows[name] = compare_one(run, TASKS, args.eval_n, progress, suite="highres", image_size=REFERENCE_SIZE)
        rows[name]["encoder"] = encoder_cost(run)
    table = comparison_table(rows, blind["accuracy"])
    table = add_encoder_column(table, rows)
    print("\n" + table)
    if args.results:
        command = "python benchmarks/compare_highres.py " + " ".join(argv if argv is not None else sys.argv[1:])
        budget = (f"align {args.align_n} caption samples, instruct {args.instruct_n} samples of small_objects + "
                  f"small_text, batch {args.batch_size}, bf16, LLM frozen (each recipe's bridge, and Monkey's "
                  f"per-tile LoRA, train); test n={args.eval_n} per task; tokens and encoder FLOPs for one "
                  f"{REFERENCE_SIZE[1]}×{REFERENCE_SIZE[0]} image")
        write_results(args.results, results_section(table, command.strip(), budget, "highres"), "highres")
        print(f"\nwrote the table to {args.results}")
    return 0


def add_encoder_column(table: str, rows: dict[str, dict]) -> str:
    """The comparison table with an 'encoder FLOPs / image' column after the visual tokens."""
    lines = table.split("\n")
    header = lines[0].split(" | ")
    at = next(index for index, cell in enumerate(header) if cell.startswith("visual tokens"))
    result = []
    for number, line in enumerate(lines):
        cells = line.split(" | ")
        if number == 0:
            cells[at] = "LLM positions / 896² image"
            cells.insert(at + 1, "encoder FLOPs / 896² image")
        elif number == 1:
            cells = line.split("|")
            cells.insert(2, "---:")
            result.append("|".join(cells))
            continue
        else:
            name = cells[0].lstrip("| ").strip()
            cells.insert(at + 1, rows[name]["encoder"] if name in rows else "–")
        result.append(" | ".join(cells))
    return "\n".join(result)


if __name__ == "__main__":
    raise SystemExit(main())
