"""Epoch times of a stage-1 run (bridge only, encoder frozen) with and without the feature cache.

The real trainer (:func:`mmbridge.train.train`) runs two epochs over generated 384 px PNG
images three times, in one process: without a cache, with an empty cache directory (epoch 1
computes the features, epoch 2 reads them) and again with the cache already there. Epoch
times come from the step callback (epoch 1 also holds the run's setup and, with a cache, the
feature computation, which is timed on its own); losses of the cached runs are checked
against the uncached run.

Models: ``--tower tiny`` (default) is the benchmark's small LLaVA (CLIP 224/16, hidden 192,
4 layers → Llama hidden 256, 4 layers); ``--tower base`` swaps in a ViT-B/16-sized tower
(hidden 768, 12 layers) in front of the same LLM, a stage 1 where the encoder dominates.

Usage: ``python benchmarks/bench_feature_cache.py [--tower tiny|base] [--samples 64] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_vs_transformers as common  # noqa: E402  (the benchmark's model builders and machine info)

from mmbridge.config import RunConfig  # noqa: E402
from mmbridge.model.multimodal import ModelConfig, MultimodalModel  # noqa: E402
from mmbridge.testing import write_shape_dataset  # noqa: E402
from mmbridge.train import trainer  # noqa: E402

BATCH = 8


def build_model(tower: str, workdir: str) -> MultimodalModel:
    """The tiny benchmark model, or the same LLM behind a ViT-B/16-sized CLIP tower."""
    model = common.build_tiny(workdir)
    if tower == "tiny":
        return model
    torch.manual_seed(0)
    config = model.export_config()
    config = ModelConfig(vision={"type": "hf", "hf_config": common._clip(224, 16, 768, 12, 12), "feature_layer": -2},
                         llm=config.llm, image_token_id=model.image_token_id)
    return MultimodalModel.from_config(config, tokenizer=model.tokenizer).eval()


class EpochClock:
    """Step-callback timestamps → per-epoch seconds; also times the feature-cache computation."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.start = time.perf_counter()
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.cache_seconds = 0.0

    def __call__(self, record: dict) -> None:
        self.stamps.append(time.perf_counter())
        self.losses.append(record["loss"])

    def epochs(self) -> list[float]:
        ends = [self.stamps[index - 1] for index in range(self.steps_per_epoch, len(self.stamps) + 1,
                                                          self.steps_per_epoch)]
        return [end - begin for begin, end in zip([self.start] + ends, ends)]


def timed_build(clock: EpochClock) -> Any:
    """``build_feature_cache`` that adds its wall time to ``clock.cache_seconds``."""
    real = trainer.build_feature_cache

    def build(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        cache = real(*args, **kwargs)
        clock.cache_seconds += time.perf_counter() - began
        return cache

    return build


def run(model: MultimodalModel, data_json: str, output: str, cache: str | None, precision: str,
        samples: int) -> EpochClock:
    """Two epochs of a bridge-only stage through the trainer; returns the clock."""
    stage = {"name": "stage1", "train": {"bridge": "full"}, "lr": 1e-3, "batch_size": BATCH, "epochs": 2,
             "precision": precision, "warmup_ratio": 0.0}
    config = RunConfig(model=model.export_config().to_dict(), stages=[stage], output_dir=output, seed=0,
                       data={"sources": [{"path": data_json}], "feature_cache": cache, "group_by_length": False})
    clock = EpochClock(math.ceil(samples / BATCH))
    real = trainer.build_feature_cache
    trainer.build_feature_cache = timed_build(clock)
    try:
        clock.start = time.perf_counter()
        trainer.train(config, progress=False, on_step=clock, model=copy.deepcopy(model))
    finally:
        trainer.build_feature_cache = real
    return clock


def report(precision: str, clocks: dict[str, EpochClock]) -> str:
    """Markdown rows: epoch times, the cache's share, and the epoch-2 / epoch-1 ratios."""
    plain = clocks["no cache"]
    lines = []
    for name, clock in clocks.items():
        first, second = clock.epochs()
        drift = max(abs(a - b) for a, b in zip(clock.losses, plain.losses))
        lines.append(f"| {precision} | {name} | {first:.2f} | {clock.cache_seconds:.2f} | {second:.2f} | "
                     f"{first / second:.2f} | {plain.epochs()[1] / second:.2f} | {drift:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the three configurations per precision and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# feature cache, stage 1\n\ncommand: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}\n"
          f"machine: {common.machine()}\n\n| precision | run | epoch 1 s | of which cache build s | epoch 2 s | "
          f"epoch 1 / epoch 2 | uncached epoch 2 / this epoch 2 | max loss difference vs uncached |\n"
          f"|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(args.tower, workdir)
        data_json = write_shape_dataset(os.path.join(workdir, "data"), args.samples, seed=0, size=args.image_size)
        for precision in args.precisions:
            cache = os.path.join(workdir, f"cache-{precision}")
            clocks = {name: run(model, data_json, os.path.join(workdir, f"{precision}-{index}"), directory,
                                precision, args.samples)
                      for index, (name, directory) in enumerate((("no cache", None), ("cache, first run", cache),
                                                                 ("cache, second run", cache)))}
            print(report(precision, clocks), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
