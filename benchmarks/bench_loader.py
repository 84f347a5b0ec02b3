"""Loader workers (``data.num_workers``): micro-batches per second with 0, 1, 2 worker processes, alone and in training.

Writes a MiniWorld caption split of 10,000 samples as JPEG files (``mmbridge data miniworld --image-format
jpeg``, quality 90, 224 px), then measures, in one run:

* the loader alone: samples/s of the stage's micro-batch stream (JPEG decode, the demo model's image
  transform to 224 px, chat template and tokenization, collate into batches of 8) for each worker count,
  over the same ``--measure`` samples; the first micro-batch (worker start-up) is timed apart;
* the trainer: samples/s of the real training loop (:func:`mmbridge.train.train`) on the demo's
  backbones (EfficientNet-Lite0 → mlp2x_gelu → SmolLM2-135M-Instruct, the demo's ``align`` stage: bridge
  trains, batch 8, ``max_length`` 288) over the same data, median of steps 2…``--steps`` (step 1 holds the
  workers' start and the first forward), in the precision the demo trains in on this CPU.

Every setting reads the same micro-batches (the stream is a pure function of seed and position), and the
trainer's losses with workers are checked equal to those without.

Usage: ``python benchmarks/bench_loader.py [--samples 10000] [--measure 4000] [--steps 8] [--workers 0 1 2]
[--data-dir DIR] [--results benchmarks/RESULTS.md] [--note TEXT]``
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_bridges import write_results  # noqa: E402  (replace a marked section of RESULTS.md)

from mmbridge.config import RunConfig, load_run_config  # noqa: E402
from mmbridge.data import MixtureDataset  # noqa: E402
from mmbridge.model.multimodal import MultimodalModel  # noqa: E402
from mmbridge.train import train  # noqa: E402
from mmbridge.train.precision import bf16_supported  # noqa: E402
from mmbridge.train.preflight import check_run, stage_data  # noqa: E402
from mmbridge.train.trainer import _StageData, stage_processor  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo_miniworld.yaml")
MARKS = ("<!-- bench_loader: begin -->", "<!-- bench_loader: end -->")
TITLE = "Loader workers: samples/s with 0, 1, 2 worker processes (bench_loader)"
TASK, SPLIT = "caption", "train"


def write_data(directory: str, samples: int) -> str:
    """The JPEG split (written with the CLI unless ``directory`` already holds it); returns the JSON path."""
    path = os.path.join(directory, f"{TASK}-{SPLIT}.json")
    if not os.path.isfile(path):
        subprocess.run([sys.executable, "-m", "mmbridge", "data", "miniworld", "--task", TASK, "--split", SPLIT,
                        "--n", str(samples), "--out", directory, "--image-format", "jpeg", "--no-progress"],
                       check=True)
    return path


def bench_run(data_json: str, workers: int, steps: int, output: str) -> RunConfig:
    """The demo recipe's backbones and ``align`` stage on the JPEG data, ``steps`` steps, ``workers`` workers."""
    run = load_run_config(RECIPE)
    align = next(stage for stage in run.stages if stage["name"] == "align")
    precision = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"  # what the demo trains in here
    stage = {**align, "data": {"sources": [{"path": data_json}], "num_workers": workers}, "steps": steps,
             "precision": precision}
    stage.pop("epochs", None)
    run.stages, run.output_dir = [stage], output
    return run


def measure_loader(run: RunConfig, model: MultimodalModel, workers: int, micro_batches: int) -> dict:
    """Samples/s of the stage's micro-batch stream (positions 1…n-1; position 0, with the workers' start, apart)."""
    stage = check_run(run)[0]
    data_config = stage_data(run, 0, stage)
    dataset = MixtureDataset(data_config, stage_processor(model, data_config, stage.name))
    data = _StageData(dataset, stage, run.seed * 1000, dataset.processor.pad_token_id, data_config.group_by_length,
                      workers)
    samples = 0
    with data.stream(1) as stream:
        began = time.perf_counter()
        stream.micro_batch(0)
        first = time.perf_counter()
        for index in range(1, micro_batches):
            samples += stream.micro_batch(index)["input_ids"].shape[0]
        done = time.perf_counter()
    return {"samples_per_s": samples / (done - first), "first_s": first - began}


def measure_trainer(run: RunConfig) -> dict:
    """Median samples/s of steps 2… of a real training run, and its losses."""
    history = train(run, progress=False).history
    rates = [record["samples_per_s"] for record in history[1:]]
    return {"samples_per_s": statistics.median(rates), "losses": [record["loss"] for record in history]}


def machine_line() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                "unknown CPU")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{name}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s) in "
            f"the training process, 1 in each worker; load average {load} at the start; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def table(loader: dict[int, dict], trainer: dict[int, dict]) -> str:
    rows = ["| workers | loader samples/s | × | first micro-batch s | trainer samples/s | × |",
            "|---:|---:|---:|---:|---:|---:|"]
    for workers in loader:
        rows.append(f"| {workers} | {loader[workers]['samples_per_s']:.1f} | "
                    f"{loader[workers]['samples_per_s'] / loader[min(loader)]['samples_per_s']:.2f} | "
                    f"{loader[workers]['first_s']:.2f} | {trainer[workers]['samples_per_s']:.2f} | "
                    f"{trainer[workers]['samples_per_s'] / trainer[min(trainer)]['samples_per_s']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000, help="JPEG samples to write")
    parser.add_argument("--measure", type=int, default=4000, help="samples the loader alone reads per setting")
    parser.add_argument("--steps", type=int, default=8, help="training steps per setting (batch 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None, help="write the data here (reused if there); default: a temp dir")
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    parser.add_argument("--note", default="", help="appended to the machine line (e.g. 'other jobs running')")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_loader.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = machine_line() + (f"; {args.note}" if args.note else "")
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as work:
        began = time.perf_counter()
        data_json = write_data(args.data_dir or os.path.join(work, "data"), args.samples)
        written = time.perf_counter() - began
        print(f"data: {data_json} ({args.samples} samples, {written:.0f} s)", flush=True)
        model = MultimodalModel.from_config(load_run_config(RECIPE).model)
        loader = {}
        for workers in args.workers:
            run = bench_run(data_json, workers, args.steps, os.path.join(work, f"run-{workers}"))
            batch = run.stages[0]["batch_size"]
            loader[workers] = measure_loader(run, model, workers, max(2, args.measure // batch))
            print(f"loader, {workers} worker(s): {loader[workers]}", flush=True)
        del model
        trainer = {}
        for workers in args.workers:
            trainer[workers] = measure_trainer(bench_run(data_json, workers, args.steps,
                                                         os.path.join(work, f"run-{workers}")))
            print(f"trainer, {workers} worker(s): {trainer[workers]['samples_per_s']:.2f} samples/s", flush=True)
        reference = trainer[args.workers[0]]["losses"]
        same = all(result["losses"] == reference for result in trainer.values())
    precision = bench_run("x", 0, 1, "x").stages[0]["precision"]
    text = table(loader, trainer)
    setup = (f"Data: {args.samples} MiniWorld caption samples as 224 px JPEG files (quality 90), written in "
             f"{written:.0f} s. Loader: {args.measure} samples per setting, the demo model's processor (224 px "
             f"EfficientNet-Lite0 transform, SmolLM2 chat template, max_length 288), batches of 8, collated; the "
             f"first micro-batch (worker start) timed apart. Trainer: the demo's `align` stage (bridge trains, "
             f"batch 8, {precision}) on EfficientNet-Lite0 + SmolLM2-135M-Instruct over the same data, median "
             f"samples/s of steps 2–{args.steps}; losses with every worker count "
             f"{'identical' if same else 'DIFFERENT'} to 0 workers'.")
    print(text)
    if args.results:
        section = "\n".join([MARKS[0], f"Command: `{command}`  ", f"Machine: {machine}  ", setup, "", text, MARKS[1]])
        write_results(args.results, section, marks=MARKS, title=TITLE)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
