"""The survey's data claims, re-tested on MiniWorld at one budget: subsets, coreset selection, mixing, yes/no balance.

    python benchmarks/data_recipes.py --results benchmarks/RESULTS.md
    python benchmarks/data_recipes.py --pool attribute=48 existence=24 counting=8 --eval-n 8 --ground-n 64 \\
        --align-n 32 --out /tmp/data_recipes                                  # a two-minute smoke run

The claims (REFERENCE.md, "Data and training recipes"):

* LLaVA-NeXT: a random 50% of the instruction mix keeps most of the score (>98%);
* SVIT (arXiv 2307.04087): a coreset chosen by concept informativeness beats a random subset of the same size, and
  rebalancing yes/no answers keeps the model from answering "yes" too often (POPE's yes-ratio);
* InstructBLIP (arXiv 2305.06500): sampling sources with probability ∝ √size beats sampling them in proportion to
  their size when they differ in size.

Every arm starts from the same aligned model — the demo's backbones (EfficientNet-Lite0, SmolLM2-135M-Instruct,
``mlp2x_gelu``) after the demo recipe's ``ground`` and ``align`` stages, trained once — and runs the demo recipe's
``instruct`` stage (bridge + LoRA, the same learning rate, batch size and precision) on its own data:

* the instruction pool is three MiniWorld task files of unequal size (default attribute 288, existence 144,
  counting 48), the existence file skewed to ``--yes-share`` "yes" answers, as instruction data often is;
* ``random-50% balanced`` is the random half with SVIT's yes/no rebalancing (the coreset of this pool keeps few
  or no yes/no questions, so rebalancing is tested on the random half too);
* ``all`` (proportional mixing: every source weight 1) and ``sqrt`` (``weight: sqrt``) train on one epoch of the
  same number of samples; ``random-50%``, ``coreset-50%`` and ``coreset-50% no balance`` (``mmbridge data select``)
  train one epoch of half the pool, so the subset arms cost half the steps — the LLaVA-NeXT claim is about keeping
  the score with half the data.

Scores are exact-match accuracy on the MiniWorld test splits (``--eval-n`` per task, the same samples for every
arm) and the existence yes-ratio; the table gives the binomial standard error. One seed: differences within about
two standard errors of a difference are noise. Finished arms are read back from their ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_bridges import median_speed, results_section, write_results  # noqa: E402

from mmbridge.config import RunConfig, load_run_config  # noqa: E402
from mmbridge.data.formats import read_records  # noqa: E402
from mmbridge.data.selection import select_records  # noqa: E402
from mmbridge.eval.harness import run_suite, save_results  # noqa: E402
from mmbridge.model.multimodal import MultimodalModel  # noqa: E402
from mmbridge.utils import atomic_path, atomic_write_json, seed_everything  # noqa: E402
from mmbridge.worlds.miniworld.writer import write_task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "demo_miniworld.yaml")
SECTION = "data_recipes"  # the RESULTS.md section (compare_bridges' markers with this name)
TITLE = "The survey's data claims on MiniWorld (data_recipes)"
TASKS = ["attribute", "existence", "counting"]
ARMS = ("all", "sqrt", "random-50%", "random-50% balanced", "coreset-50%", "coreset-50% no balance")


def write_pool(out: str, pool: dict[str, int], yes_share: float, seed: int) -> dict[str, str]:
    """One LLaVA JSON file per pool task under ``out/pool`` (images beside them); the existence file holds
    ``yes_share`` "yes" answers. Returns task → path, plus ``"pool"`` → all of them in one file."""
    directory = os.path.join(out, "pool")
    paths = {}
    for task, count in pool.items():
        path = os.path.join(directory, f"{task}.json")
        if not os.path.isfile(path):
            drawn = 4 * count if task == "existence" else count  # enough of each answer to skew the share
            written = write_task(task, "train", drawn, directory, seed=seed, progress=False)
            records = read_records(written)
            if task == "existence":
                records = skew_yes(records, count, yes_share)
            _write_json(path, records[:count])
        paths[task] = path
    combined = os.path.join(directory, "pool.json")
    if not os.path.isfile(combined):
        _write_json(combined, [record for task in pool for record in read_records(paths[task])])
    paths["pool"] = combined
    return paths


def skew_yes(records: list[dict], count: int, yes_share: float) -> list[dict]:
    """``count`` records of which ``round(count * yes_share)`` answer "yes", in their original order."""
    wanted = {"yes": round(count * yes_share), "no": count - round(count * yes_share)}
    kept = []
    for record in records:
        answer = record["conversations"][-1]["value"].strip().lower()
        if wanted.get(answer, 0) > 0:
            wanted[answer] -= 1
            kept.append(record)
    if any(wanted.values()):
        raise SystemExit(f"the existence draw has too few answers of a kind to skew it (still wanted {wanted})")
    return kept


def arm_sources(arm: str, paths: dict[str, str], pool: dict[str, int], out: str, seed: int) -> tuple[list[dict], dict]:
    """The instruct stage's data sources for ``arm`` and what selection reported (empty for the mixing arms)."""
    if arm in ("all", "sqrt"):
        weight = "sqrt" if arm == "sqrt" else 1.0
        return [{"path": paths[task], "weight": weight} for task in pool], {}
    method = "random" if arm.startswith("random") else "coreset"
    records = read_records(paths["pool"])
    kept, report = select_records(records, method=method, keep=0.5, seed=seed,
                                  balance_yes_no=arm.endswith(" balanced") or
                                  (method == "coreset" and not arm.endswith("no balance")))
    path = os.path.join(out, "pool", f"{arm.replace('%', '').replace(' ', '-')}.json")
    _write_json(path, kept)
    return [{"path": path, "image_root": os.path.dirname(paths["pool"])}], report


def base_model(recipe: RunConfig, out: str, ground_n: int, align_n: int, progress: bool) -> str:
    """The demo recipe's ``ground`` and ``align`` stages at the given sizes, trained once; returns ``final/``."""
    from mmbridge.train import train

    run = copy.deepcopy(recipe)
    run.output_dir = os.path.join(out, "base")
    run.stages = [copy.deepcopy(stage) for stage in recipe.stages if stage["name"] in ("ground", "align")]
    for stage, n in zip(run.stages, (ground_n, align_n)):
        stage["data"]["sources"][0]["miniworld"]["n"] = n
    final = os.path.join(run.output_dir, "final")
    if not os.path.isdir(final):
        train(run, resume=True, progress=progress)
    return final


def instruct_run(recipe: RunConfig, arm: str, sources: list[dict], out: str) -> RunConfig:
    """The demo recipe's ``instruct`` stage on ``sources``, one epoch."""
    stage = copy.deepcopy(next(stage for stage in recipe.stages if stage["name"] == "instruct"))
    stage["data"] = {"sources": sources}
    stage["epochs"], stage["save_every"] = 1, 20
    run = copy.deepcopy(recipe)
    run.output_dir = os.path.join(out, "arms", arm.replace("%", "").replace(" ", "-"))
    run.stages = [stage]
    return run


def run_arm(run: RunConfig, base: str, report: dict, eval_n: int, progress: bool) -> dict:
    """Train one arm from the aligned model, evaluate it, and return (and write) its summary."""
    from mmbridge.train import train

    path = os.path.join(run.output_dir, "summary.json")
    settings = {"run": run.to_dict(), "base": base, "eval_n": eval_n}
    if os.path.isfile(path):
        with open(path) as handle:
            saved = json.load(handle)
        if saved["settings"] != json.loads(json.dumps(settings)):
            raise SystemExit(f"{path} was written with other settings; pass a fresh --out or delete it")
        return saved
    began = time.perf_counter()
    result = train(run, resume=True, progress=progress, model=MultimodalModel.from_pretrained(base))
    seconds = time.perf_counter() - began
    final = os.path.join(run.output_dir, "final")
    model = MultimodalModel.from_pretrained(final)
    results = run_suite(model, "miniworld", TASKS, n=eval_n, progress=progress, model_dir=final)
    save_results(os.path.join(run.output_dir, "eval.json"), results)
    samples = round(sum(record["samples_per_s"] * record["seconds"] for record in result.history))
    summary = {"settings": settings, "steps": len(result.history), "samples": samples, "train_seconds": seconds,
               "samples_per_s": median_speed(result.history, "instruct"),
               "accuracy": {task: results["tasks"][task]["accuracy"] for task in TASKS},
               "yes_ratio": results["tasks"]["existence"].get("yes_ratio"),
               "selection": _selection_summary(report)}
    atomic_write_json(path, summary)
    return summary


def blind_scores(recipe: RunConfig, base: str, out: str, eval_n: int, progress: bool) -> dict:
    """The aligned model without the image, on the same test samples."""
    path = os.path.join(out, "blind.json")
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    seed_everything(recipe.seed)
    results = run_suite(MultimodalModel.from_pretrained(base), "miniworld", TASKS, n=eval_n, blind=True,
                        progress=progress)
    blind = {"accuracy": {task: results["tasks"][task]["accuracy"] for task in TASKS},
             "yes_ratio": results["tasks"]["existence"].get("yes_ratio")}
    atomic_write_json(path, blind)
    return blind


def table(rows: dict[str, dict], blind: dict, eval_n: int) -> str:
    """Markdown: one row per arm (accuracy per task, mean, mean relative to ``all``, yes-ratio, cost)."""
    header = ["arm", "train samples", "steps", *TASKS, "mean", "mean / all", "existence yes-ratio",
              "train s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    reference = _mean(rows["all"]["accuracy"]) if "all" in rows else float("nan")
    for arm, row in rows.items():
        mean = _mean(row["accuracy"])
        cells = [f"{row['accuracy'][task]:.1%}" for task in TASKS]
        lines.append(f"| {arm} | {row['samples']} | {row['steps']} | "
                     + " | ".join(cells) + f" | {mean:.1%} | {mean / reference:.2f} | "
                     f"{_percent(row['yes_ratio'])} | {row['train_seconds']:.0f} |")
    lines.append("| *blind (aligned model, no image)* | – | – | " +
                 " | ".join(f"{blind['accuracy'][task]:.1%}" for task in TASKS) +
                 f" | {_mean(blind['accuracy']):.1%} | – | {_percent(blind['yes_ratio'])} | – |")
    lines.append("")
    for arm, row in rows.items():
        chosen = row.get("selection")
        if chosen:
            answers = chosen["yes_no_kept"]
            lines.append(f"- {arm}: kept {chosen['kept']} of {chosen['total']}, covering "
                         f"{chosen['vocabulary_covered']} of {chosen['vocabulary']} vocabulary concepts; training "
                         f"yes/no answers {answers['yes']} yes / {answers['no']} no.")
    error = math.sqrt(0.25 / eval_n)
    lines.append("")
    lines.append(f"n = {eval_n} test samples per task (the same for every arm): one accuracy's standard error is at "
                 f"most {error:.1%}, a difference of two arms' {error * math.sqrt(2):.1%}; the mean over "
                 f"{len(TASKS)} tasks' {error / math.sqrt(len(TASKS)):.1%}.")
    return "\n".join(lines)


def _selection_summary(report: dict) -> dict:
    """The few figures of a selection report the table's notes use."""
    if not report:
        return {}
    return {"kept": report["kept"], "total": report["total"], "yes_no_kept": report["yes_no"]["kept"],
            "vocabulary_covered": report["vocabulary"]["covered_kept"], "vocabulary": report["vocabulary"]["size"]}


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _write_json(path: str, records: list[dict]) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(records, handle)


def parse_pool(items: list[str]) -> dict[str, int]:
    pool = {}
    for item in items:
        task, _, count = item.partition("=")
        if task not in TASKS or not count.isdigit() or int(count) < 2:
            raise SystemExit(f"--pool takes TASK=N with TASK in {TASKS} and N >= 2, got {item!r}")
        pool[task] = int(count)
    return pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", nargs="+", default=["attribute=288", "existence=144", "counting=48"],
                        help="instruction pool: MiniWorld train tasks and sizes")
    parser.add_argument("--yes-share", type=float, default=0.75, help="share of 'yes' in the existence file")
    parser.add_argument("--ground-n", type=int, default=1600, help="scenes of the region-word stage")
    parser.add_argument("--align-n", type=int, default=600, help="captions of the align stage")
    parser.add_argument("--arms", nargs="+", default=[arm for arm in ARMS if arm != "random-50% balanced"],
                        choices=ARMS, help="default: all but 'random-50%% balanced' (added after the recorded run)")
    parser.add_argument("--eval-n", type=int, default=96, help="test samples per task")
    parser.add_argument("--out", default=os.path.join("runs", "data_recipes"))
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    recipe = load_run_config(RECIPE)
    pool = parse_pool(args.pool)
    progress = not args.no_progress
    paths = write_pool(args.out, pool, args.yes_share, recipe.seed)
    base = base_model(recipe, args.out, args.ground_n, args.align_n, progress)
    rows = {}
    for arm in args.arms:
        print(f"\n== {arm}", flush=True)
        sources, report = arm_sources(arm, paths, pool, args.out, recipe.seed)
        rows[arm] = run_arm(instruct_run(recipe, arm, sources, args.out), base, report, args.eval_n, progress)
    text = table(rows, blind_scores(recipe, base, args.out, args.eval_n, progress), args.eval_n)
    print("\n" + text)
    if args.results:
        command = "python benchmarks/data_recipes.py " + " ".join(argv if argv is not None else sys.argv[1:])
        budget = (f"demo backbones; ground {args.ground_n} scenes + align {args.align_n} captions once; each arm "
                  f"the demo's instruct stage (bridge + LoRA r 8, lr 1e-3, batch 8, bf16 where native) for one "
                  f"epoch of its data; pool {', '.join(args.pool)}, existence {args.yes_share:.0%} yes")
        write_results(args.results, results_section(text, command.strip(), budget, SECTION), SECTION, title=TITLE)
        print(f"\nwrote the table to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
