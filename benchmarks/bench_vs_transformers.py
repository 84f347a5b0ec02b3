"""mmbridge vs transformers' ``LlavaForConditionalGeneration``, same weights, one process, interleaved.

Two models, each built once and exported with :func:`mmbridge.interop.to_hf_llava` so both
sides hold identical weights:

* ``tiny`` — CLIP 224/16 (hidden 192, 4 layers, 196 visual tokens) → MLP → Llama (hidden 256,
  4 layers, vocabulary 4096), random weights;
* ``smollm2`` — CLIP 224/32 (hidden 384, 6 layers, 49 visual tokens) → MLP → the bundled
  SmolLM2-135M-Instruct (30 layers, vocabulary 49 153).

Measured, with the two implementations interleaved repeat by repeat (medians reported, so a
burst of load from other processes hits both): training-step samples/s (forward, backward,
AdamW step) with only the bridge trainable and with bridge + LoRA on the LLM, in fp32 and in
bf16 autocast, for transformers, mmbridge from pixels and mmbridge from cached encoder
features; peak memory of a training step; prefill latency; greedy decode tokens/s at batch 1
and 8. The mmbridge rows run what its trainer runs: label-only loss, frozen encoder without
autograd, and in bf16 the frozen LLM weights cast once (:mod:`mmbridge.train.precision`).
Losses and greedy tokens of the two implementations are checked equal (fp32) before timing.

Achieved GFLOP/s of a training step are compared with this machine's measured matmul peak
(2048×2048, fp32 and bf16). FLOPs are counted analytically (:func:`step_flops`): every linear
layer costs 2·params·tokens forward, plus 2·params·tokens for the gradient of its input when
anything before it trains, plus 2·params·tokens for its weight gradient when it trains
(hence 6·P·T for trained weights, 4·P·T for frozen weights that gradients pass through and
2·P·T for the frozen encoder); attention adds 4·L²·d per head and layer forward and twice
that backward; the LM head is counted at the label positions only (the useful work; a
full-vocabulary head over every position is transformers' extra cost, not counted).

Usage: ``python benchmarks/bench_vs_transformers.py [--quick] [--models tiny smollm2] [--threads N]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmbridge.generate import generate
from mmbridge.interop import to_hf_llava
from mmbridge.model.lora import LoraSpec, inject_lora
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.testing import tiny_tokenizer
from mmbridge.train.precision import bf16_supported, frozen_weights_in_bf16
from mmbridge.train.recipe import StageConfig, TuneSpec, apply_stage, set_trainable

IMPLS = ("transformers", "mmbridge", "mmbridge+cache")
MODES = ("bridge", "bridge+lora")
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LORA = LoraSpec(r=8, alpha=16, dropout=0.05)


@dataclasses.dataclass
class Setting:
    """One benchmarked model and the sizes used for it; ``memory_modes``: modes whose peak memory is profiled."""

    name: str
    train_batch: int
    decode_tokens: int
    repeats: int
    memory_modes: tuple[str, ...] = MODES
    precisions: tuple[str, ...] = PRECISIONS


# -- machine -------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, threads and library versions."""
    model_name = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def matmul_peak(dtype: torch.dtype, threads: int, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``×``size`` matmul in ``dtype`` on ``threads`` threads (best of ``repeats``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    left, right = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    left @ right
    best = min(_seconds(lambda: left @ right) for _ in range(repeats))
    torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + written), the bound of weight-streaming decode steps."""
    source = torch.ones(megabytes * 2**18)
    target = torch.empty_like(source)
    best = min(_seconds(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * 4 / best / 1e9


def _seconds(function: Callable[[], Any]) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


# -- models --------------------------------------------------------------------------------------
def _clip(image_size: int, patch: int, hidden: int, layers: int, heads: int) -> dict:
    return {"model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch, "hidden_size": hidden,
            "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "projection_dim": hidden}


def build_tiny(workdir: str) -> MultimodalModel:
    """CLIP 224/16 (192 wide, 4 layers) → MLP → Llama (256 wide, 4 layers, vocabulary 4096), seeded."""
    tokenizer = tiny_tokenizer(os.path.join(workdir, "tokenizer"))
    llama = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 1024, "tie_word_embeddings": False, "initializer_range": 0.05,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    config = ModelConfig(vision={"type": "hf", "hf_config": _clip(224, 16, 192, 4, 3), "feature_layer": -2},
                         llm={"type": "hf", "hf_config": llama})  # <image> joins the tokenizer, inside the 4096 ids
    return MultimodalModel.from_config(config, tokenizer=tokenizer).eval()


def build_smollm2() -> MultimodalModel:
    """CLIP 224/32 (384 wide, 6 layers) → MLP → the bundled SmolLM2-135M-Instruct, seeded."""
    torch.manual_seed(0)
    config = ModelConfig(vision={"type": "hf", "hf_config": _clip(224, 32, 384, 6, 6), "feature_layer": -2},
                         llm={"type": "smollm2"})
    return MultimodalModel.from_config(config).eval()


def build(name: str, workdir: str) -> tuple[MultimodalModel, nn.Module]:
    """The mmbridge model and its transformers export (identical weights), both in eval mode."""
    ours = build_tiny(workdir) if name == "tiny" else build_smollm2()
    return ours, to_hf_llava(ours)


# -- inputs --------------------------------------------------------------------------------------
def training_batch(model: MultimodalModel, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows: 20 prompt tokens, one image, 8 tokens, an answer of 10 + 3·row labelled tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for row in range(batch):
        answer = torch.randint(5, 250, (10 + 3 * row,), generator=generator)
        ids = torch.cat([torch.randint(5, 250, (20,), generator=generator),
                         torch.full((model.tokens_per_image,), model.image_token_id),
                         torch.randint(5, 250, (8,), generator=generator), answer])
        label = torch.full_like(ids, -100)
        label[-len(answer):] = answer
        rows.append(ids)
        labels.append(label)
    length = max(len(row) for row in rows)
    input_ids = torch.full((batch, length), model.tokenizer.pad_token_id)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    label_ids = torch.full((batch, length), -100)
    for index, (ids, label) in enumerate(zip(rows, labels)):
        input_ids[index, :len(ids)], attention_mask[index, :len(ids)], label_ids[index, :len(ids)] = ids, 1, label
    size = model.vision.transform.output_size
    pixel_values = torch.randn(batch, 3, *size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids, "pixel_values": pixel_values}


def prompt_batch(model: MultimodalModel, batch: int) -> dict[str, torch.Tensor]:
    """The training rows without answers, LEFT-padded, for generation."""
    full = training_batch(model, batch, seed=1)
    lengths = [int((labels == -100).logical_and(mask.bool()).sum()) for labels, mask in
               zip(full["labels"], full["attention_mask"])]
    width = max(lengths)
    input_ids = torch.full((batch, width), model.tokenizer.pad_token_id)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for index, length in enumerate(lengths):
        input_ids[index, width - length:] = full["input_ids"][index, :length]
        attention_mask[index, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": full["pixel_values"]}


# -- training ------------------------------------------------------------------------------------
def hf_parts(hf_model: nn.Module) -> dict[str, nn.Module]:
    """transformers' LLaVA under mmbridge's module keys (the LM head belongs to ``llm``)."""
    return {"vision": hf_model.model.vision_tower, "bridge": hf_model.model.multi_modal_projector,
            "llm": nn.ModuleList([hf_model.model.language_model, hf_model.lm_head])}


def prepare(ours: MultimodalModel, hf_model: nn.Module, mode: str) -> tuple[MultimodalModel, nn.Module]:
    """Copies of both models set up for ``mode``: the same trainable parameters, LoRA initialised alike."""
    ours, hf_model = copy.deepcopy(ours), copy.deepcopy(hf_model)
    llm = TuneSpec(mode="lora", r=LORA.r, alpha=LORA.alpha, dropout=LORA.dropout) if mode == "bridge+lora" else "frozen"
    torch.manual_seed(1)
    apply_stage(ours, StageConfig(train={"bridge": "full", "llm": llm}), log=False)
    if mode == "bridge+lora":
        torch.manual_seed(1)
        inject_lora(hf_model.model.language_model, LORA)
    for key, module in hf_parts(hf_model).items():
        set_trainable(module, TuneSpec(mode={"bridge": "full", "llm": "lora" if mode == "bridge+lora" else "frozen"}
                                       .get(key, "frozen")))
    ours.train()
    hf_model.train()
    ours.vision.eval()  # frozen encoders run in eval mode on both sides (no dropout either way)
    hf_model.model.vision_tower.eval()
    return ours, hf_model


class Trainer:
    """One implementation's training step on a fixed batch: forward, backward, AdamW step, zero_grad."""

    def __init__(self, impl: str, model: nn.Module, batch: dict[str, torch.Tensor], precision: str) -> None:
        self.impl, self.model, self.precision = impl, model, precision
        self.batch = dict(batch)
        if impl == "mmbridge+cache":
            with torch.no_grad(), _autocast(precision):
                self.batch["image_features"] = model.vision(self.batch.pop("pixel_values"))
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self) -> float:
        with _autocast(self.precision):
            if self.impl == "transformers":
                loss = self.model(**self.batch).loss
            else:
                loss = self.model(**self.batch, return_logits="none").loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``warmup + repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            elapsed = _seconds(function)
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(function: Callable[[], Any]) -> int:
    """Peak bytes of live tensor memory above the starting level during ``function``, from profiler events.

    Every op's allocations minus frees, in order of start time (op granularity: a kernel's
    internal scratch space is not seen).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        function()
    events = sorted((event for event in recorded.events() if event.self_cpu_memory_usage),
                    key=lambda event: event.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def train_results(ours: MultimodalModel, hf_model: nn.Module, setting: Setting,
                  memory: bool) -> tuple[list[dict], list[dict]]:
    """Samples/s, GFLOP/s and peak memory of every (mode, precision, implementation); and the removable parts."""
    batch = training_batch(ours, setting.train_batch)
    rows, parts = [], []
    for mode in MODES:
        our_model, their_model = prepare(ours, hf_model, mode)
        for precision in setting.precisions:
            rows += _train_rows(our_model, their_model, batch, mode, precision, setting,
                                memory and mode in setting.memory_modes)
        if mode == "bridge":
            parts = removable_parts(their_model, batch, setting.repeats, setting.precisions)
    return rows, parts


def _train_rows(ours: MultimodalModel, hf_model: nn.Module, batch: dict[str, torch.Tensor], mode: str,
                precision: str, setting: Setting, memory: bool) -> list[dict]:
    """The three implementations of one (mode, precision), timed interleaved."""
    models = {"transformers": hf_model, "mmbridge": ours, "mmbridge+cache": ours}
    with frozen_weights_in_bf16(ours, precision, exclude=set()) as frozen:  # as the trainer does in bf16
        steps = {impl: Trainer(impl, models[impl], batch, precision) for impl in IMPLS}
        _check_losses(steps, precision)
        seconds = interleaved(steps, setting.repeats)
        peaks = {impl: peak_memory(steps[impl]) for impl in IMPLS} if memory else {}
        copies = sum(tensor.numel() * tensor.element_size() for tensor in frozen.casts.values()) if frozen else 0
    rows = []
    for impl in IMPLS:
        useful = step_flops(ours, batch, cached=impl == "mmbridge+cache")
        rows.append({"mode": mode, "precision": precision, "impl": impl, "seconds": seconds[impl],
                     "samples_per_s": setting.train_batch / seconds[impl], "gflop": useful / 1e9,
                     "gflops": useful / seconds[impl] / 1e9, "peak_mb": peaks.get(impl, 0) / 2**20,
                     "bf16_weight_copies_mb": copies / 2**20 if impl != "transformers" else 0.0})
    return rows


def removable_parts(hf_model: nn.Module, batch: dict[str, torch.Tensor], repeats: int,
                    precisions: tuple[str, ...] = PRECISIONS) -> list[dict]:
    """Seconds of the parts of transformers' bridge-only step that mmbridge removes, per precision.

    ``hf_model`` is set up for the bridge-only stage (LM head frozen: no weight gradient).

    ``vision``: the frozen tower's forward (the feature cache removes it); ``full_head``: LM head
    over every position + loss + backward to the hidden states; ``label_head``: the same at the
    label positions only (what mmbridge computes instead).
    """
    config = hf_model.config.text_config
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, config.hidden_size, generator=generator)
    labels = batch["labels"]
    keep = labels[:, 1:] != -100
    rows = []
    for precision in precisions:
        def vision() -> None:
            with torch.no_grad(), _autocast(precision):
                hf_model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)

        def head(label_only: bool) -> None:
            states = nn.Parameter(hidden.clone())  # stands for the last hidden states, gradients wanted
            with _autocast(precision):
                if label_only:
                    logits = hf_model.lm_head(states[:, :-1][keep])
                    loss = nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep])
                else:
                    loss = hf_model.loss_function(logits=hf_model.lm_head(states), labels=labels,
                                                  vocab_size=config.vocab_size)
            loss.backward()

        seconds = interleaved({"vision": vision, "full_head": lambda: head(False), "label_head": lambda: head(True)},
                              repeats)
        rows.append({"precision": precision, **seconds})
    return rows


def amdahl_table(parts: list[dict], rows: list[dict]) -> str:
    """Markdown: the share of transformers' bridge-only step that mmbridge removes, and the best ratio it allows."""
    lines = ["| precision | transformers step s | vision s | full-vocab head+loss s | label-only head s | "
             "best ratio from pixels | best ratio with cache |", "|---|---:|---:|---:|---:|---:|---:|"]
    for part in parts:
        step = next(row["seconds"] for row in rows if row["mode"] == "bridge" and
                    row["precision"] == part["precision"] and row["impl"] == "transformers")
        saved_head = part["full_head"] - part["label_head"]
        lines.append(f"| {part['precision']} | {step:.3f} | {part['vision']:.3f} | {part['full_head']:.3f} | "
                     f"{part['label_head']:.3f} | {step / max(step - saved_head, 1e-9):.2f} | "
                     f"{step / max(step - saved_head - part['vision'], 1e-9):.2f} |")
    return "\n".join(lines)


def op_profile(ours: MultimodalModel, hf_model: nn.Module, setting: Setting, rows: int = 12) -> str:
    """torch.profiler tables (self CPU time by op) of the bridge-only steps, both implementations and precisions."""
    batch = training_batch(ours, setting.train_batch)
    our_model, their_model = prepare(ours, hf_model, "bridge")
    tables = []
    for precision in setting.precisions:
        with frozen_weights_in_bf16(our_model, precision, exclude=set()):
            for impl, model in (("transformers", their_model), ("mmbridge+cache", our_model)):
                step = Trainer(impl, model, batch, precision)
                step()
                with profile(activities=[ProfilerActivity.CPU]) as recorded:
                    step()
                table = recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                      max_name_column_width=50)
                tables.append(f"### {impl}, bridge only, {precision}\n\n```\n{table}\n```")
    return "\n\n".join(tables)


def _check_losses(steps: dict[str, Trainer], precision: str) -> None:
    """The first loss of each implementation (before any update), equal in fp32 to 1e-4."""
    with torch.no_grad(), _autocast(precision):
        losses = {}
        for impl, step in steps.items():
            kwargs = {} if impl == "transformers" else {"return_logits": "none"}
            losses[impl] = float(step.model(**step.batch, **kwargs).loss)
    spread = max(losses.values()) - min(losses.values())
    if precision == "fp32" and spread > 1e-4:
        raise AssertionError(f"losses differ between implementations: {losses}")


# -- FLOPs ---------------------------------------------------------------------------------------
def _linear_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Weights of the ``nn.Linear`` layers in ``module`` (only trainable/frozen ones when asked)."""
    return sum(sub.weight.numel() for sub in module.modules()
               if isinstance(sub, nn.Linear) and (trainable is None or sub.weight.requires_grad == trainable))


def _vision_flops(model: MultimodalModel, images: int) -> float:
    """Forward FLOPs of the encoder: patch embedding, every layer's linears and attention (all layers run)."""
    config = model.vision.model.config
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1  # CLIP's CLS token
    patch_embedding = 2 * 3 * config.patch_size**2 * config.hidden_size * patches
    layers = 2 * _linear_params(model.vision) * tokens + config.num_hidden_layers * 4 * tokens**2 * config.hidden_size
    return images * (patch_embedding + layers)


def step_flops(model: MultimodalModel, batch: dict[str, torch.Tensor], cached: bool) -> float:
    """Analytic matmul FLOPs of one mmbridge training step (see the module docstring)."""
    images, (batch_size, length) = batch["pixel_values"].shape[0], batch["input_ids"].shape
    tokens = batch_size * length
    label_tokens = int((batch["labels"][:, 1:] != -100).sum())
    vision = 0.0 if cached else _vision_flops(model, images)
    bridge = 6 * _linear_params(model.bridge) * images * model.tokens_per_image
    decoder, head = model.llm.decoder, model.llm.lm_head
    frozen, trained = _linear_params(decoder, trainable=False), _linear_params(decoder, trainable=True)
    config = model.llm.config
    attention = 3 * config.num_hidden_layers * 4 * batch_size * length**2 * config.hidden_size
    head_flops = 4 * head.weight.numel() * label_tokens
    return vision + bridge + (4 * frozen + 6 * trained) * tokens + attention + head_flops


# -- generation ----------------------------------------------------------------------------------
def decode_results(ours: MultimodalModel, hf_model: nn.Module, setting: Setting) -> list[dict]:
    """Prefill latency and decode tokens/s at batch 1 and 8, with greedy tokens checked equal."""
    rows = []
    hf_model.generation_config.eos_token_id = None
    pad = ours.tokenizer.pad_token_id
    for batch_size in (1, 8):
        prompts = prompt_batch(ours, batch_size)
        new = setting.decode_tokens

        def ours_run(count: int) -> torch.Tensor:
            return generate(ours, **prompts, max_new_tokens=count, eos_token_id=[])

        def hf_run(count: int) -> torch.Tensor:
            with torch.inference_mode():
                output = hf_model.generate(**prompts, max_new_tokens=count, do_sample=False, pad_token_id=pad)
            return output[:, prompts["input_ids"].shape[1]:]

        ours_tokens, hf_tokens = ours_run(new), hf_run(new)
        if ours_tokens.shape != (batch_size, new) or not torch.equal(ours_tokens, hf_tokens):
            raise AssertionError(f"greedy tokens differ at batch {batch_size}")
        seconds = interleaved({"transformers/1": lambda: hf_run(1), "mmbridge/1": lambda: ours_run(1),
                               "transformers/n": lambda: hf_run(new), "mmbridge/n": lambda: ours_run(new)},
                              setting.repeats)
        for impl in ("transformers", "mmbridge"):
            first, total = seconds[f"{impl}/1"], seconds[f"{impl}/n"]
            rows.append({"batch": batch_size, "impl": impl, "prefill_ms": first * 1e3, "new_tokens": new,
                         "decode_tokens_per_s": batch_size * (new - 1) / max(total - first, 1e-9),
                         "prompt_length": prompts["input_ids"].shape[1]})
    return rows


# -- report --------------------------------------------------------------------------------------
def train_table(rows: list[dict], peaks: dict[str, float]) -> str:
    """Markdown: one line per (mode, precision, impl) with the ratio to transformers."""
    lines = ["| mode | precision | implementation | samples/s | × transformers | peak step memory MB | "
             "GFLOP/s (useful) | % of matmul peak |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next(other for other in rows if other["mode"] == row["mode"] and
                    other["precision"] == row["precision"] and other["impl"] == "transformers")
        memory = f"{row['peak_mb']:.0f}" if row["peak_mb"] else "–"
        lines.append(f"| {row['mode']} | {row['precision']} | {row['impl']} | {row['samples_per_s']:.2f} | "
                     f"{row['samples_per_s'] / base['samples_per_s']:.2f} | {memory} | {row['gflops']:.1f} | "
                     f"{100 * row['gflops'] / peaks[row['precision']]:.0f}% |")
    return "\n".join(lines)


def decode_table(rows: list[dict], weight_bytes: int, bandwidth: float) -> str:
    """Markdown: prefill latency and decode rate per batch size, with ratios to transformers.

    The last column is the decode rate if every step only streamed the LLM's weights once at
    the measured copy bandwidth (a bound for small batches).
    """
    bound_steps = bandwidth * 1e9 / weight_bytes
    lines = ["| batch | implementation | prefill ms | × (lower is better) | decode tokens/s | × transformers | "
             "weight-streaming bound tokens/s |", "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next(other for other in rows if other["batch"] == row["batch"] and other["impl"] == "transformers")
        lines.append(f"| {row['batch']} | {row['impl']} | {row['prefill_ms']:.1f} | "
                     f"{row['prefill_ms'] / base['prefill_ms']:.2f} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} | "
                     f"{bound_steps * row['batch']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown tables (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "smollm2"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 repeats (about a minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine one thread is disturbed least)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory steps")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler op tables of the training steps")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="training precisions to time (default: fp32, and bf16 where this CPU runs it natively; "
                             "emulated bf16 is slow and says nothing about either implementation)")
    args = parser.parse_args(argv)
    precisions = tuple(args.precisions or (PRECISIONS if bf16_supported(torch.device("cpu")) else ("fp32",)))
    torch.set_num_threads(args.threads)
    names = args.models or (["tiny"] if args.quick else ["tiny", "smollm2"])
    settings = {"tiny": Setting("tiny", 8, 32, 2 if args.quick else 5),
                "smollm2": Setting("smollm2", 2, 8, 2, memory_modes=("bridge",))}
    report = header(args.threads, precisions)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            setting = dataclasses.replace(settings[name], repeats=args.repeats or settings[name].repeats,
                                          precisions=precisions)
            report["models"][name] = run_model(name, setting, workdir, not args.no_memory, report, args.profile)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


def header(threads: int, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, Any]:
    """Print and return the machine, matmul peaks (of the precisions timed) and copy bandwidth."""
    info = machine()
    peaks = {f"{name}/{count}": matmul_peak(DTYPES[name], count) for name in precisions for count in (1, 2)}
    torch.set_num_threads(threads)
    bandwidth = copy_bandwidth()
    print(f"# mmbridge vs transformers\n\ncommand: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
    print(f"machine: {json.dumps(info)}\nmatmul 2048² GFLOP/s (dtype/threads): " +
          ", ".join(f"{key}: {value:.0f}" for key, value in peaks.items()) +
          f"\ncopy bandwidth: {bandwidth:.1f} GB/s", flush=True)
    return {"machine": info, "matmul_peak_gflops": peaks, "copy_gb_per_s": bandwidth, "models": {}}


def run_model(name: str, setting: Setting, workdir: str, memory: bool, report: dict, profiled: bool) -> dict:
    """Build one model pair, measure everything, print its tables; returns the measurements."""
    began = time.perf_counter()
    ours, hf_model = build(name, workdir)
    threads = torch.get_num_threads()
    peaks = {precision: report["matmul_peak_gflops"].get(f"{precision}/{threads}") or
             matmul_peak(DTYPES[precision], threads)
             for precision in setting.precisions}
    train_rows, parts = train_results(ours, hf_model, setting, memory)
    decode_rows = decode_results(ours, hf_model, setting)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.llm.parameters()) - \
        ours.llm.model.get_input_embeddings().weight.numel() * 4 * (not ours.llm.config.tie_word_embeddings)
    print(f"\n## {name} (train batch {setting.train_batch}, {setting.repeats} repeats, {threads} thread(s), "
          f"{time.perf_counter() - began:.0f} s)\n\n{train_table(train_rows, peaks)}\n\n"
          f"{amdahl_table(parts, train_rows)}\n\n"
          f"{decode_table(decode_rows, weight_bytes, report['copy_gb_per_s'])}", flush=True)
    if profiled:
        print(f"\n{op_profile(ours, hf_model, setting)}", flush=True)
    return {"setting": dataclasses.asdict(setting), "train": train_rows, "removable": parts, "decode": decode_rows,
            "llm_weight_bytes_per_token": weight_bytes}


if __name__ == "__main__":
    sys.exit(main())
