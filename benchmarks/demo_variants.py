"""The demo's recipe and the variants tried on the way to it: time per stage, total time, accuracy — per CPU.

    python benchmarks/demo_variants.py                          # every variant on this CPU
    python benchmarks/demo_variants.py --variants demo          # one of them
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/demo_variants.py --variants demo       # as an AVX2-only CPU (no native bf16) runs it
    python benchmarks/demo_variants.py --record "make demo (fresh clone)" demo_out/summary.json

Each variant is a recipe (``configs/demo_miniworld.yaml`` or one tried before it, in
``benchmarks/demo_recipes/``) with dotted overrides, run exactly as ``make demo``
runs it (``mmbridge.demo.run_miniworld``: training, then the MiniWorld test splits next to the
blind baseline), each in its own directory under ``--out``; a finished variant is read back from
its ``summary.json``. Results are kept per CPU (its ISA level as torch reports it, and whether
bf16 is native) in ``--json``, and the table of all of them goes into ``benchmarks/RESULTS.md``
between markers. Setup (``make``'s venv) is not included; ``make demo`` adds it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmbridge.demo import EVAL_TASKS, RECIPE, SIZES, run_miniworld  # noqa: E402
from mmbridge.forecast import describe_cpu  # noqa: E402
from mmbridge.utils import atomic_path, atomic_write_json  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- demo_variants: begin -->", "<!-- demo_variants: end -->"
RECIPES = os.path.join(ROOT, "benchmarks", "demo_recipes")
FP32 = list(SIZES["fp32"])
# name → (what it is, recipe, dotted overrides). "demo" is `make demo` where bf16 is native, "demo-fp32" where not.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "demo": ("the recipe as shipped: ground 3,200, align 1,000 captions, 640 drills", RECIPE, []),
    "demo-fp32": ("the shipped recipe at the size `make demo` trains where bf16 is not native", RECIPE, FP32),
    "demo-560-352": ("the shipped recipe with 560 captions and 352 drills (the first fp32 size, 11 min on AVX2)", RECIPE,
                     ["stages.1.data.sources.0.miniworld.n=560", "stages.2.data.sources.0.miniworld.n=352"]),
    "ground-drills": ("grounding on 3,200 scenes, then 352 drills: no caption stage",
                      os.path.join(RECIPES, "ground_drills.yaml"), []),
    "ground-drills/constant": ("the same, grounding at a constant lr without clipping, weight decay 0.01",
                               os.path.join(RECIPES, "ground_drills.yaml"),
                               ["stages.0.schedule=constant", "stages.0.warmup_ratio=0", "stages.0.max_grad_norm=null",
                                "stages.0.weight_decay=0.01"]),
    "ground-drills/4800": ("the same, grounding on 4,800 scenes", os.path.join(RECIPES, "ground_drills.yaml"),
                           ["stages.0.data.sources.0.miniworld.n=4800"]),
    "ground-drills/640": ("the same, 640 drills", os.path.join(RECIPES, "ground_drills.yaml"),
                          ["stages.1.data.sources.0.miniworld.n=640"]),
    "ground-drills/bridge-lr": ("the same, the bridge at lr 2e-4 in the drills (LoRA at 1e-3)",
                                os.path.join(RECIPES, "ground_drills.yaml"), ["stages.1.lr=2e-4"]),
    "captions-drills": ("1,000 captions (chat template, system prompt), then 640 drills: the demo two sessions ago",
                        os.path.join(RECIPES, "captions_drills.yaml"), []),
    "plain-captions-drills": ("640 plain-template captions, then 352 drills",
                              os.path.join(RECIPES, "plain_captions_drills.yaml"), []),
    "ground-plain-captions-drills": ("grounding on 1,600 scenes, 640 plain-template captions, 352 drills",
                                     os.path.join(RECIPES, "ground_plain_captions_drills.yaml"), []),
    "ground-plain-captions-drills/b": ("the same with grounding on 3,200, 600 captions at a constant lr 1e-3",
                                       os.path.join(RECIPES, "ground_plain_captions_drills.yaml"),
                                       ["stages.0.data.sources.0.miniworld.n=3200",
                                        "stages.1.data.sources.0.miniworld.n=600", "stages.1.lr=1e-3",
                                        "stages.1.schedule=constant", "stages.1.warmup_ratio=0"]),
}


def compact(summary: dict) -> dict:
    """The summary without per-sample predictions (those stay in the run's eval.json)."""
    def strip(scores: dict) -> dict:
        return {task: {key: value for key, value in entry.items() if key != "predictions"}
                for task, entry in scores.items()}

    return {**summary, "scores": strip(summary["scores"]), "blind": strip(summary["blind"])}


def run_variant(name: str, out: str, n: int) -> dict:
    """Run (or read back) one variant on this CPU."""
    directory = os.path.join(out, name)
    summary_path = os.path.join(directory, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as handle:
            return json.load(handle)
    _, recipe, overrides = VARIANTS[name]
    return run_miniworld(directory, recipe, n, tuple(overrides), fresh=False)


def row(name: str, summary: dict) -> str:
    """One markdown row: stage speeds and times, total, scores and the targets."""
    stages, scores, blind = summary["stages"], summary["scores"], summary["blind"]
    speed = " / ".join(f"{stage['samples_per_s']:.2f}" for stage in stages.values())
    seconds = " / ".join(f"{stage['seconds']:.0f}" for stage in stages.values())
    existence = scores.get("existence", {})
    cells = [name, speed, seconds, f"{summary['seconds']['training']:.0f}", f"{summary['seconds']['evaluation']:.0f}",
             f"{summary['seconds']['total']:.0f}"]
    for task in ("attribute", "attribute:compositional", "existence", "counting"):
        entry = scores.get(task)
        cells.append(f"{entry['accuracy']:.1%} ({blind[task]['accuracy']:.1%})" if entry else "–")
    cells.append(f"{existence['yes_ratio']:.0%}" if "yes_ratio" in existence else "–")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| variant | samples/s per stage | seconds per stage | training s | evaluation s | total s | attribute "
          "(blind) | compositional (blind) | existence (blind) | counting (blind) | existence yes-ratio |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def table(results: dict[str, dict[str, dict]]) -> str:
    """One table per CPU; a variant row per run."""
    parts = []
    for cpu, rows in results.items():
        parts += [f"**{cpu}**", "", HEADER, *(row(name, summary) for name, summary in rows.items()), ""]
    lines = [f"- `{name}`: {what} — `{os.path.relpath(recipe, ROOT)}`" + (f" `{' '.join(overrides)}`" if overrides else "")
             for name, (what, recipe, overrides) in VARIANTS.items()]
    return "\n".join(parts + ["Variants (recipe, then dotted overrides):", "", *lines])


def write_results(path: str, section: str) -> None:
    """Replace the marked section of ``path`` (or append it under a heading)."""
    text = open(path).read() if os.path.isfile(path) else ""
    block = f"{MARK_BEGIN}\n{section}\n{MARK_END}"
    pattern = re.compile(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n## The demo on each CPU: variants tried\n\n" + block + "\n"
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=60, help="test samples per task (the demo's)")
    parser.add_argument("--out", default=os.path.join("runs", "demo_variants"))
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "demo_variants.json"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    parser.add_argument("--record", nargs=2, metavar=("NAME", "SUMMARY"),
                        help="add a finished run's summary.json (e.g. a fresh clone's `make demo`) as row NAME")
    args = parser.parse_args(argv)

    cpu = describe_cpu().split(";")[0].removesuffix(", 1 threads").removesuffix(", 2 threads")
    cpu += ", bf16 native" if "bf16 native" in describe_cpu() else ", bf16 not native (fp32)"
    results = json.load(open(args.json)) if os.path.isfile(args.json) else {}
    results = {key: {name: compact(summary) for name, summary in rows.items()} for key, rows in results.items()}
    out = os.path.join(args.out, re.sub(r"[^A-Za-z0-9]+", "-", cpu).strip("-").lower())
    if args.record:
        name, path = args.record
        with open(path) as handle:
            results.setdefault(cpu, {})[name] = compact(json.load(handle))
        atomic_write_json(args.json, results)
        args.variants = []
    for name in args.variants:
        print(f"\n== {name} on {cpu}", flush=True)
        results.setdefault(cpu, {})[name] = compact(run_variant(name, out, args.n))
        atomic_write_json(args.json, results)
    print("\n" + table(results))
    write_results(args.results, table(results))
    print(f"\nwrote {args.json} and the table in {args.results} (tasks: {', '.join(EVAL_TASKS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
