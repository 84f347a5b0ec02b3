"""How long a run will take on this CPU, said after its first steps, and what the CPU can do.

CPUs of one kind of machine differ: AMX Xeons run bf16 matmuls ~6x faster than fp32, AVX512-BF16
CPUs ~2x, and AVX2-only CPUs not natively at all (a bf16 stage then trains in fp32). A run planned
on one of them can take three times as long on another, so :class:`Forecast` measures instead of
assuming: after a few steps it prints the speed, when training will end and when the whole job
(training, then work measured in training-token equivalents, such as an evaluation) will end; and
when that is beyond the job's budget it says so in one line, with what to expect.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from mmbridge.train.precision import bf16_supported

WARMUP_STEPS = 2  # the first steps of a process run slower (allocator, first kernel calls): not measured
MEASURED_STEPS = 4


def describe_cpu() -> str:
    """The CPU's ISA level as torch sees it and whether bf16 stages run in bf16 here."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = bf16_supported(torch.device("cpu"))
    return (f"CPU: {capability}, {torch.get_num_threads()} threads; bf16 "
            + ("native: bf16 stages train under bf16 autocast" if native
               else "not native: bf16 stages fall back to fp32 (slower)"))


def minutes(seconds: float) -> str:
    """``"9 min 40 s"``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@dataclass
class StagePlan:
    """A stage's name and the tokens (input positions) it will process in all."""

    name: str
    tokens: float


class Forecast:
    """A training ``on_step`` callback that prints, after the first steps of each stage that runs the LLM, the
    measured speed and when the job will end (a later stage can run at another speed: a LoRA stage backpropagates
    into more weights, so its forecast replaces the earlier one).

    ``stages`` are the run's stages in order with their token totals; ``after_tokens`` is the work
    that follows training, in training-token equivalents (an evaluation); ``budget_s`` the time the
    whole job should take from ``began`` (a ``time.perf_counter()`` value).
    """

    def __init__(self, stages: list[StagePlan], after_tokens: float, began: float, budget_s: float,
                 say: Callable[[str], None] = tqdm.write) -> None:
        self.stages, self.after_tokens, self.began, self.budget_s = stages, after_tokens, began, budget_s
        self.say = say
        self.records: list[dict] = []  # the current stage's first steps
        self.said: set[str] = set()  # stages whose forecast was printed
        self.warned = False
        self.estimate_s: float | None = None  # the latest predicted total

    def __call__(self, record: dict) -> None:
        if record["stage"] in self.said or not record.get("tokens_per_s"):
            return  # said already, or a stage that does not run the LLM (its speed predicts nothing else)
        if self.records and self.records[-1]["stage"] != record["stage"]:
            self.records = []  # a new stage: measure it afresh
        self.records.append(record)
        if len(self.records) < WARMUP_STEPS + MEASURED_STEPS:
            return
        self.said.add(record["stage"])
        measured = self.records[WARMUP_STEPS:]
        tokens_per_s = statistics.median(entry["tokens_per_s"] for entry in measured)
        samples_per_s = statistics.median(entry["samples_per_s"] for entry in measured)
        left = self.tokens_left(record)
        training_s, after_s = left / tokens_per_s, self.after_tokens / tokens_per_s
        elapsed = time.perf_counter() - self.began
        self.estimate_s = elapsed + training_s + after_s
        self.say(f"speed: {samples_per_s:.1f} samples/s, {tokens_per_s:.0f} tokens/s in stage '{record['stage']}'; "
                 f"training ends in about {minutes(training_s)}, the rest takes about {minutes(after_s)}: "
                 f"about {minutes(self.estimate_s)} in all")
        if self.estimate_s > self.budget_s and not self.warned:
            self.warned = True
            self.say(f"this CPU is slower than the {minutes(self.budget_s)} this job is planned for "
                     f"({describe_cpu()}): expect about {minutes(self.estimate_s)} in all")

    def tokens_left(self, record: dict) -> float:
        """Tokens of the current stage's remaining steps and of every later stage."""
        names = [stage.name for stage in self.stages]
        index = names.index(record["stage"])
        current = self.stages[index].tokens * (1 - record["step"] / record["stage_steps"])
        return current + sum(stage.tokens for stage in self.stages[index + 1:])


def stage_plans(run, model, probe: int = 32) -> list[StagePlan]:
    """Each stage's token total: its samples per epoch (or steps × batch) times the mean length of up to
    ``probe`` of its examples, processed exactly (chat template, image tokens) without opening images."""
    from mmbridge.data import MixtureDataset
    from mmbridge.train.preflight import check_run, stage_data
    from mmbridge.train.trainer import stage_processor

    plans = []
    for index, stage in enumerate(check_run(run)):
        data = stage_data(run, index, stage)
        processor = stage_processor(model, data, stage.name, stage.objective)
        dataset = MixtureDataset(data, processor)
        lengths = [len(processor(sample, pixels=False)["input_ids"]) for sample in dataset.samples[:probe]]
        per_epoch = len(dataset.epoch_indices(0, run.seed))
        samples = stage.steps * stage.batch_size * stage.grad_accum if stage.steps else stage.epochs * per_epoch
        through_llm = stage.objective == "lm"  # region_words never runs the LLM: its time is small and not forecast
        plans.append(StagePlan(stage.name, samples * statistics.mean(lengths) if through_llm else 0.0))
    return plans
