"""Equal-budget bridge comparison on MiniWorld: input-token bridges and bridges inside the LLM.

    python benchmarks/compare_bridges.py --bridges mlp pooled_mlp perceiver qformer qwen_resampler \
        --results benchmarks/RESULTS.md                       # input-token bridges, the bundled backbones
    python benchmarks/compare_bridges.py --bridges mlp visual_expert mma moe --section fusion \
        --results benchmarks/RESULTS.md                       # deep fusion (CogVLM, LaVIN, MoE-LLaVA) vs mlp
    python benchmarks/compare_bridges.py --bridges mlp gated_xattn --section flamingo \
        --tasks attribute multi_image video --instruct-tasks attribute_drill multi_image video --shots 2 4 \
        --max-length 1024 --results benchmarks/RESULTS.md      # Flamingo's gated cross-attention vs mlp
    python benchmarks/compare_bridges.py --bridges mlp qformer --align-n 64 --instruct-n 64 --eval-n 20

Every bridge gets the same training budget — the same samples in the same order, the same
steps, batch size and precision — between the same frozen encoder and frozen LLM (the base
recipe's ``model.vision`` / ``model.llm`` / ``processor``, by default ``configs/demo_miniworld.yaml``):

* ``align``: MiniWorld short captions, only the bridge trains (a fusion bridge's projector
  alone, as CogVLM and MoE-LLaVA pretrain it: the parts inside the LLM wait for instructions);
* ``instruct``: MiniWorld attribute drills (colour/shape/size, a count, balanced existence),
  or the ``--instruct-tasks`` named, in equal shares; only the bridge trains (a fusion bridge's
  parts inside the LLM included).

``--shots K …`` adds the first test task evaluated with K solved in-context examples per query.

The LLM's own weights stay frozen in both stages, so differences come from the bridge alone and
one blind baseline (the frozen LLM without the image) serves every row. A bridge inside the LLM
can still change how the LLM answers text: the table's *text kept* column asks every trained
model the same text-only questions (``TEXT_QUESTIONS``) and counts greedy answers identical to
the frozen LLM's. Parameters are reported as trainable, total, and active per token (MoE runs
``top_k`` of its experts; a visual expert's token runs either the expert or the original). Each bridge keeps its own
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
from mmbridge.utils import atomic_path, atomic_write_json, seed_everything

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
    # inside the LLM: experts copied from the LLM take the smaller rate; LaVIN's zero-initialised adapters the larger
    "visual_expert": ({"type": "visual_expert"}, 3e-3, 1e-4),
    "mma": ({"type": "mma"}, 3e-3, 1e-3),
    "moe": ({"type": "moe"}, 3e-3, 2e-4),
    # Flamingo: a Perceiver Resampler and a gated block before every third layer; its gates start closed, so
    # its align stage trains all of it (a closed gate passes no signal to the resampler)
    "gated_xattn": ({"type": "gated_xattn", "every": 3,
                     "resampler": {"type": "perceiver", "num_latents": QUERIES, "depth": 2, "heads": 8}}, 3e-3, 1e-3),
}
FUSION = ("visual_expert", "mma", "moe")  # their align stage trains the projector only
TEXT_QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is 12 plus 7?", "Write one sentence about the sea.", "What does a thermometer measure?",
    "Which planet is closest to the sun?", "Give a synonym for happy.", "What colour is grass?",
    "Translate 'thank you' into French.", "What is the opposite of cold?", "How many days are in a week?",
]


def comparison_run(base: RunConfig, name: str, out: str, align_n: int, instruct_n: int,
                   batch_size: int, bridges: dict[str, tuple[dict, float, float]] = BRIDGES,
                   instruct_tasks: tuple[str, ...] = ("attribute_drill",), max_length: int | None = None) -> RunConfig:
    """The base recipe's backbones and processor with bridge ``name`` and the comparison's two stages
    (``instruct_n`` samples shared equally by ``instruct_tasks``)."""
    spec, align_lr, instruct_lr = bridges[name]
    model = copy.deepcopy(base.model)
    model["bridge"] = copy.deepcopy(spec)

    def stage(stage_name: str, tasks: dict[str, int], lr: float, train: dict | str) -> dict:
        sources = [{"miniworld": {"task": task, "split": "train", "n": n}} for task, n in tasks.items()]
        return {"name": stage_name, "data": {"sources": sources}, "train": {"bridge": train}, "lr": lr, "epochs": 1,
                "batch_size": batch_size, "warmup_ratio": 0.05, "precision": "bf16", "save_every": 25}

    align = {"mode": "full", "only": ["projector"]} if name in FUSION else "full"
    share = max(1, instruct_n // len(instruct_tasks))
    processor = copy.deepcopy(base.processor)
    if max_length:
        processor["max_length"] = max_length
    return RunConfig(model=model, processor=processor, seed=base.seed, output_dir=os.path.join(out, name),
                     stages=[stage("align", {"caption": align_n}, align_lr, align),
                             stage("instruct", {task: share for task in instruct_tasks}, instruct_lr, "full")])


def median_speed(history: list[dict], stage: str) -> float:
    """Median samples/s over the logged steps of ``stage`` (NaN when none ran in this process)."""
    speeds = [record["samples_per_s"] for record in history if record["stage"] == stage]
    return statistics.median(speeds) if speeds else float("nan")


def text_answers(model: MultimodalModel, questions: list[str] = TEXT_QUESTIONS, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to text-only questions (no image), through the model's chat template."""
    return [model.chat(question, [], max_new_tokens=max_new_tokens) for question in questions]


def parameter_summary(model: MultimodalModel) -> dict[str, int]:
    """Trainable in the last stage (as saved; else the bridge's), total, and active per token."""
    total = sum(parameter.numel() for parameter in model.parameters())
    idle = model.inactive_parameters_per_token()
    saved = model.parameters_at_save
    trainable = sum(counts["trainable"] for counts in saved.values()) if saved else \
        sum(parameter.numel() for parameter in model.bridge.parameters())
    return {"trainable": trainable, "total": total, "active": total - idle}


def compare_one(run: RunConfig, tasks: list[str], eval_n: int, progress: bool = True,
                base_answers: list[str] | None = None, shots: tuple[int, ...] = (), suite: str = "miniworld",
                image_size: tuple[int, int] | None = None) -> dict:
    """Train (or resume) one bridge, evaluate it on ``suite``, and return its summary (also written to
    summary.json); with ``base_answers`` (the frozen LLM's), also how many text-only answers stayed the same.
    ``image_size`` (height, width): report the LLM positions of one image of that size (high resolution)."""
    from mmbridge.train import train

    summary_path = os.path.join(run.output_dir, "summary.json")
    settings = {"run": run.to_dict(), "tasks": tasks, "eval_n": eval_n, **({"shots": list(shots)} if shots else {})}
    if os.path.isfile(summary_path):
        return _reuse(summary_path, settings)
    began = time.perf_counter()
    result = train(run, resume=True, progress=progress)
    train_seconds = time.perf_counter() - began
    final = os.path.join(run.output_dir, "final")
    model = MultimodalModel.from_pretrained(final)
    results = run_suite(model, suite, tasks, n=eval_n, progress=progress, model_dir=final)
    save_results(os.path.join(run.output_dir, "eval.json"), results)
    accuracy = {task: entry["accuracy"] for task, entry in results["tasks"].items()}
    for count in shots:  # the first task again, with in-context examples
        shot_results = run_suite(model, suite, tasks[:1], n=eval_n, progress=progress, model_dir=final,
                                 shots=count)
        save_results(os.path.join(run.output_dir, f"eval-{count}shot.json"), shot_results)
        accuracy.update({f"{task} ({count}-shot)": entry["accuracy"] for task, entry in shot_results["tasks"].items()})
    parameters = parameter_summary(model)
    answers = text_answers(model) if base_answers is not None else None
    summary = {
        "settings": settings,
        "bridge": run.model["bridge"],
        "visual_tokens": len(model.image_token_ids(image_size)) if image_size else model.tokens_per_image,
        "trainable_parameters": parameters["trainable"],
        "total_parameters": parameters["total"],
        "active_parameters": parameters["active"],
        "text_answers": answers,
        "text_kept": None if answers is None else sum(a == b for a, b in zip(answers, base_answers)),
        "samples_per_s": {stage: median_speed(result.history, stage) for stage in ("align", "instruct")},
        "train_seconds": train_seconds,
        "steps": len(result.history),
        "lr": {stage["name"]: stage["lr"] for stage in run.stages},
        "accuracy": accuracy,
    }
    atomic_write_json(summary_path, summary)
    return summary


def blind_baseline(run: RunConfig, tasks: list[str], eval_n: int, progress: bool = True,
                   suite: str = "miniworld") -> dict:
    """The frozen LLM without the image (one row: the LLM's weights are frozen in every comparison run):
    ``accuracy`` per task and ``text_answers``, its greedy answers to ``TEXT_QUESTIONS``."""
    path = os.path.join(os.path.dirname(run.output_dir), "blind.json")
    settings = {"llm": run.model["llm"], "processor": run.processor, "tasks": tasks, "eval_n": eval_n,
                "questions": TEXT_QUESTIONS}
    if os.path.isfile(path):
        return _reuse(path, settings)
    seed_everything(run.seed)  # random test backbones come out as in the training runs
    model = MultimodalModel.from_config(run.model, processor_settings=run.processor)
    results = run_suite(model, suite, tasks, n=eval_n, blind=True, progress=progress)
    blind = {"settings": settings, "accuracy": {task: entry["accuracy"] for task, entry in results["tasks"].items()},
             "text_answers": text_answers(model)}
    atomic_write_json(path, blind)
    return blind


def _reuse(path: str, settings: dict) -> dict:
    """A finished result written with the same settings; another budget or task list is an error, not a reuse."""
    with open(path) as handle:
        saved = json.load(handle)
    if json.loads(json.dumps(settings)) != saved.get("settings"):
        raise SystemExit(f"{path} was written with other settings (budget, recipe, tasks or n); "
                         f"pass a fresh --out or delete it")
    return saved


def comparison_table(rows: dict[str, dict], blind: dict[str, float]) -> str:
    """Markdown: one row per bridge plus the blind baseline (``blind``: its accuracy per task); a column per
    evaluated task split (and few-shot run), then tokens, parameters, text answers kept and speeds."""
    tasks = list(dict.fromkeys([task for row in rows.values() for task in row["accuracy"]] + list(blind)))
    header = ["bridge", *tasks, "visual tokens / image", "trainable params", "total params", "active params",
              "text kept", "align samples/s", "instruct samples/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in rows.items():
        cells = [f"{row['accuracy'][task]:.1%}" if task in row["accuracy"] else "–" for task in tasks]
        speed = row["samples_per_s"]
        kept = "–" if row.get("text_kept") is None else f"{row['text_kept']}/{len(row['text_answers'])}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['visual_tokens']} | "
                     f"{row['trainable_parameters']:,} | {row.get('total_parameters', 0):,} | "
                     f"{row.get('active_parameters', 0):,} | {kept} | {speed['align']:.2f} | {speed['instruct']:.2f} |")
    lines.append("| *blind (no image)* | " + " | ".join(f"{blind[task]:.1%}" if task in blind else "–" for task in tasks) +
                 " | 0 | – | – | – | – | – | – |")
    return "\n".join(lines)


def markers(section: str = "") -> tuple[str, str]:
    """The begin/end comments around a section of RESULTS.md (``section`` names a second table)."""
    if not section:
        return MARK_BEGIN, MARK_END
    return f"<!-- compare_bridges {section}: begin -->", f"<!-- compare_bridges {section}: end -->"


def results_section(table: str, command: str, budget: str, section: str = "") -> str:
    """The RESULTS.md section: markers, command, machine, budget, table."""
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d}")
    begin, end = markers(section)
    return "\n".join([begin, f"Command: `{command}`  ", f"Machine: {machine}  ", f"Budget: {budget}", "",
                      table, end])


def write_results(path: str, text_of_section: str, section: str = "", marks: tuple[str, str] | None = None,
                  title: str | None = None) -> None:
    """Replace the marked section of ``path`` (or append it under a heading if there is none).

    ``marks`` (begin, end) and ``title`` let another benchmark write its own section (default: this one's)."""
    text = open(path).read() if os.path.isfile(path) else ""
    begin, end = marks or markers(section)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: text_of_section, text)
    else:
        title = title or (f"Bridge comparison on MiniWorld ({section}, equal budget)" if section else
                          "Bridge comparison on MiniWorld (equal budget)")
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + text_of_section + "\n"
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=BASE_RECIPE, help="base recipe: backbones and processor settings")
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=list(BRIDGES))
    parser.add_argument("--align-n", type=int, default=320, help="caption samples (align stage)")
    parser.add_argument("--instruct-n", type=int, default=320, help="instruct-stage samples (all instruct tasks)")
    parser.add_argument("--instruct-tasks", nargs="+", default=["attribute_drill"],
                        help="MiniWorld train tasks of the instruct stage, equal shares")
    parser.add_argument("--shots", nargs="+", type=int, default=[], help="also the first test task with K shots")
    parser.add_argument("--max-length", type=int, default=None, help="processor max_length (video needs more)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="MiniWorld test tasks")
    parser.add_argument("--eval-n", type=int, default=48, help="test samples per task")
    parser.add_argument("--out", default=os.path.join("runs", "compare_bridges"))
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    parser.add_argument("--section", default="", help="name of the RESULTS.md section to write (another table)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    base = load_run_config(args.recipe)
    progress = not args.no_progress
    rows = {}
    runs = {name: comparison_run(base, name, args.out, args.align_n, args.instruct_n, args.batch_size,
                                 instruct_tasks=tuple(args.instruct_tasks), max_length=args.max_length)
            for name in args.bridges}
    blind = blind_baseline(next(iter(runs.values())), args.tasks, args.eval_n, progress)
    for name, run in runs.items():
        print(f"\n== {name}", flush=True)
        rows[name] = compare_one(run, args.tasks, args.eval_n, progress, blind["text_answers"], tuple(args.shots))
    table = comparison_table(rows, blind["accuracy"])
    print("\n" + table)
    if args.results:
        command = "python benchmarks/compare_bridges.py " + " ".join(argv if argv is not None else sys.argv[1:])
        budget = (f"align {args.align_n} caption samples, instruct {args.instruct_n} samples of "
                  f"{' + '.join(args.instruct_tasks)}, "
                  f"batch {args.batch_size}, bf16, bridge only (encoder and LLM frozen; a fusion bridge's align "
                  f"stage trains its projector only); test n={args.eval_n} per task; per-bridge learning rates in "
                  f"`BRIDGES`; text kept: greedy answers to {len(TEXT_QUESTIONS)} text-only questions identical "
                  f"to the frozen LLM's")
        write_results(args.results, results_section(table, command.strip(), budget, args.section), args.section)
        print(f"\nwrote the table to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
