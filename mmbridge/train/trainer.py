"""The training loop: stages in order, accelerate for devices/processes, exact resume.

Data order is a pure function of (seed, stage, epoch): micro-batch ``m`` of a stage
is always the same samples, so resuming needs no iterator state — the loop restarts
at the saved step, restores weights, optimizer, scheduler and RNG, and produces the
same losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mmbridge.config import RunConfig, save_run_config
from mmbridge.data import DataConfig, MixtureDataset, Processor, batch_indices, collate, model_inputs
from mmbridge.eval.plots import plot_gates
from mmbridge.model.multimodal import MODULE_KEYS, MultimodalModel
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.feature_cache import CachedFeatureDataset, build_feature_cache
from mmbridge.train.interrupt import StopOnInterrupt, TrainingInterrupted
from mmbridge.train.precision import FrozenBf16Weights, frozen_weights_in_bf16, resolve_precision
from mmbridge.train.preflight import check_run, stage_data
from mmbridge.train.recipe import StageConfig, apply_stage, autocast, format_table, lr_lambda, optimizer_groups
from mmbridge.train.region_words import WordGroups, check_grid, region_word_loss
from mmbridge.utils import seed_everything

logger = logging.getLogger("mmbridge")
StepCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    """The trained model, the per-step log, and samples skipped per stage (by reason)."""

    model: MultimodalModel
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    output_dir: str = ""


class _StageData:
    """Deterministic micro-batches of one stage: micro-batch ``m`` → (epoch, batch) → collated tensors."""

    def __init__(self, dataset: MixtureDataset, stage: StageConfig, seed: int, pad_token_id: int,
                 group_by_length: bool) -> None:
        self.dataset, self.stage, self.seed, self.pad_token_id = dataset, stage, seed, pad_token_id
        self.group_by_length = group_by_length
        self._epochs: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self._batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError(f"stage '{stage.name}' has no training samples")

    def _batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: batch_indices(self.dataset, epoch, self.seed, self.stage.batch_size,
                                                 self.group_by_length)}
        return self._epochs[epoch]

    def micro_batch(self, index: int) -> dict | None:
        epoch, position = divmod(index, self.batches_per_epoch)
        examples = [self.dataset[i] for i in self._batches(epoch)[position]]
        examples = [example for example in examples if example is not None]
        return collate(examples, self.pad_token_id) if examples else None


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")  # bf16 autocast is applied per stage (stages may differ)


def train(run: RunConfig, resume: bool = False, progress: bool = True,
          on_step: StepCallback | None = None, model: MultimodalModel | None = None) -> TrainResult:
    """Run every stage of ``run``; with ``resume``, continue from the newest checkpoint in ``run.output_dir``.

    The recipe is checked first (:func:`~mmbridge.train.preflight.check_run`), and a resumed run
    must use the recipe its checkpoint was trained with. Ctrl-C stops after the current step,
    writes a checkpoint and raises :class:`~mmbridge.train.interrupt.TrainingInterrupted`.
    """
    stages = check_run(run)
    checkpoint_dir = os.path.join(run.output_dir, "checkpoints")
    state, saved, saved_path = ckpt.TrainState(), None, None
    if resume:
        saved_path = ckpt.latest_checkpoint(checkpoint_dir)
        if saved_path is None:
            logger.warning("--resume: no checkpoint in %s; starting from scratch", checkpoint_dir)
        else:
            ckpt.check_recipe_unchanged(os.path.join(run.output_dir, "recipe.yaml"), run.to_dict(), saved_path)
            saved = ckpt.read_state(saved_path)
            state = ckpt.saved_state(saved)
            logger.info("resuming from %s (stage %d, step %d)", saved_path, state.stage_index, state.step)
    seed_everything(run.seed)
    model = model or MultimodalModel.from_config(run.model, processor_settings=run.processor)
    accelerator = _accelerator()
    os.makedirs(run.output_dir, exist_ok=True)
    save_run_config(run, os.path.join(run.output_dir, "recipe.yaml"))
    _rewrite_log(run.output_dir, state.history)
    result = TrainResult(model, state.history, output_dir=run.output_dir)
    touched: set[str] = set()
    check_upcycle(model, stages)
    for index, stage in enumerate(stages):
        resuming = saved is not None and index == state.stage_index
        if resuming and state.step == 0:  # saved at a stage boundary: restore before this stage's LoRA init
            ckpt.load_trainable(saved_path, model)
            ckpt.restore_rng(saved_path, saved)
        if stage.upcycle:  # copies the FFNs as trained so far; a checkpoint of later training overwrites them
            model.bridge.upcycle()
        rows = apply_stage(model, stage, log=False)
        touched |= {name for name, p in model.named_parameters() if p.requires_grad}
        if index < state.stage_index:
            continue
        table = f"stage {index + 1}/{len(stages)} '{stage.name}'\n{format_table(rows)}"
        tqdm.write(table) if progress else logger.info(table)
        mid_stage = saved if resuming and state.step > 0 else None
        _run_stage(run, index, stage, model, accelerator, state, touched, mid_stage, saved_path, progress,
                   on_step, result)
        state.stage_index, state.step, state.micro = index + 1, 0, None
    if saved is not None and saved["stage_index"] >= len(stages):  # every stage had finished
        ckpt.load_trainable(saved_path, model)
        logger.info("every stage had finished in %s: nothing left to train", saved_path)
    final = os.path.join(run.output_dir, "final")
    if accelerator.is_main_process:
        model.save_pretrained(final)
        logger.info("saved the trained model to %s", final)
    return result


def _stage_data(run: RunConfig, index: int, stage: StageConfig, model: MultimodalModel, precision: str,
                accelerator: Any, progress: bool) -> tuple[_StageData, MixtureDataset | CachedFeatureDataset]:
    data_config = stage_data(run, index, stage)
    processor = stage_processor(model, data_config, stage.name, stage.objective)
    dataset = MixtureDataset(data_config, processor)
    if data_config.feature_cache and stage.spec("vision").mode == "frozen":
        with accelerator.main_process_first():  # the main process computes; the others then open it
            cache = build_feature_cache(data_config.feature_cache, dataset, model.vision, precision,
                                        progress=progress and accelerator.is_main_process)
        dataset = CachedFeatureDataset(dataset, cache)
    pad_id = processor.pad_token_id
    return _StageData(dataset, stage, run.seed * 1000 + index, pad_id, data_config.group_by_length), dataset


def stage_processor(model: MultimodalModel, data: DataConfig, stage: str, objective: str = "lm") -> Processor:
    """The model's processor with a stage's data settings (``max_length``, ``template``, ``prefix_lm``); a
    ``region_words`` stage reads no text, so its examples carry images and regions only."""
    overrides: dict[str, Any] = {"max_length": data.max_length} if data.max_length else {}
    if objective == "region_words":
        overrides["text"] = False
    if data.prefix_lm:
        if not model.llm.is_encoder_decoder:
            raise ValueError(f"stage '{stage}' data sets prefix_lm, BLIP-2's objective for encoder-decoder "
                             f"LLMs, but the LLM ({type(model.llm.model).__name__}) is decoder-only")
        overrides["prefix_lm"] = True
    if data.template != "chat":
        overrides["template"] = data.template
    if data.labels == "all":
        overrides["label_all"] = True
    if data.video_stride != 1:
        overrides["video_stride"] = data.video_stride
    return model.processor(**overrides)


def _run_stage(run: RunConfig, index: int, stage: StageConfig, model: MultimodalModel, accelerator: Any,
               state: ckpt.TrainState, touched: set[str], saved: dict | None, saved_path: str | None,
               progress: bool, on_step: StepCallback | None, result: TrainResult) -> None:
    precision = resolve_precision(stage.precision, accelerator.device)
    data, dataset = _stage_data(run, index, stage, model, precision, accelerator, progress)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_step = stage.grad_accum * world
    total_steps = stage.steps or math.ceil(stage.epochs * data.batches_per_epoch / micro_per_step)
    groups, param_names = optimizer_groups(model, stage)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, stage.warmup_ratio, stage.schedule))
    start = 0
    if saved is not None:
        start = ckpt.restore_mid_stage(saved_path, saved, model, optimizer, param_names, scheduler)
    cursor = state.micro if saved is not None and state.micro is not None else start * stage.grad_accum
    trained_model = accelerator.prepare_model(model) if world > 1 else model
    optimizer = accelerator.prepare_optimizer(optimizer)
    _set_modes(model, stage)
    trainable = [p for group in groups for p in group["params"]]
    words = _region_words(stage, model, dataset)
    bar = tqdm(total=total_steps, initial=start, desc=stage.name, disable=not progress or not accelerator.is_main_process,
               dynamic_ncols=True)
    with frozen_weights_in_bf16(model, precision, touched) as frozen, StopOnInterrupt() as stop:
        for step in range(start, total_steps):
            began = time.perf_counter()
            loss_sum, samples, tokens, seen, empty = 0.0, 0, 0, 0, 0
            aux: dict[str, float] = {}  # a fusion bridge's auxiliary loss terms, summed over micro-batches
            counts: dict[str, Any] = {}  # and its statistics (counts), summed likewise
            read: dict[str, list[int]] = {}  # region_words: attribute → [cells read right, cells labelled]
            for _ in range(stage.grad_accum):  # grad_accum micro-batches that hold samples
                batch, cursor, skipped = _next_batch(data, cursor, world, rank, stage.name)
                empty += skipped
                with autocast(precision, accelerator.device):
                    if words is None:
                        output = trained_model(**model_inputs(batch), return_logits="none")
                        loss, labelled = output.loss, output.num_label_tokens
                        seen += int(batch["attention_mask"].sum())  # positions through the LLM
                        for name, value in output.aux_losses.items():
                            aux[name] = aux.get(name, 0.0) + float(value.detach())
                        add_counts(counts, output.stats)
                    else:
                        loss, labelled, counts = region_word_loss(model, batch, words)
                        for name, (right, total) in counts.items():
                            sums = read.setdefault(name, [0, 0])
                            sums[0], sums[1] = sums[0] + right, sums[1] + total
                accelerator.backward(loss / stage.grad_accum)
                loss_sum += float(loss.detach())
                samples += batch["input_ids"].shape[0]
                tokens += labelled
            if stage.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, stage.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step, state.global_step, state.micro = step + 1, state.global_step + 1, cursor
            seconds = max(time.perf_counter() - began, 1e-9)
            record = {"stage": stage.name, "stage_index": index, "step": step + 1, "stage_steps": total_steps,
                      "global_step": state.global_step,
                      "loss": loss_sum / stage.grad_accum, "lr": learning_rate, "samples_per_s": samples / seconds,
                      "tokens_per_s": seen / seconds, "label_tokens": tokens, "seconds": seconds}
            if read:  # how often each visual token reads as its region's word, per attribute
                record["word_accuracy"] = {name: right / total for name, (right, total) in read.items() if total}
            if aux:  # already inside "loss"
                record["aux_losses"] = {name: value / stage.grad_accum for name, value in aux.items()}
            record.update(counts)
            if hasattr(model.bridge, "step_report"):  # e.g. the tanh gates of gated cross-attention, every step
                record.update(model.bridge.step_report())
            if empty:
                record["empty_batches"] = empty  # every sample of these micro-batches was skipped
            result.history.append(record)
            _append_log(run.output_dir, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            bar.update(1)
            stage_done = step + 1 == total_steps

            def save() -> str | None:
                if not accelerator.is_main_process:
                    return None
                where = ckpt.TrainState(index + 1, 0, state.global_step, result.history) if stage_done else \
                    ckpt.TrainState(index, step + 1, state.global_step, result.history, cursor)
                with _fp32(frozen):
                    return ckpt.save_checkpoint(os.path.join(run.output_dir, "checkpoints"), model, touched,
                                                optimizer, param_names, scheduler, where)

            written = save() if stage_done or (stage.save_every and (step + 1) % stage.save_every == 0) else None
            if on_step is not None:
                with _fp32(frozen):
                    on_step(record)
            if stop.requested:
                bar.close()
                written = written or save()
                raise TrainingInterrupted(
                    f"stopped at step {step + 1} of {total_steps} of stage '{stage.name}' ({state.global_step} steps "
                    f"in all); checkpoint {written}; resume with --resume", written)
    bar.close()
    model.eval()
    stage_records = [record for record in result.history if record["stage_index"] == index]
    if accelerator.is_main_process and any("gates" in record for record in stage_records):
        path = plot_gates(stage_records, os.path.join(run.output_dir, f"gates-{index + 1}-{stage.name}.png"),
                          title=f"stage {index + 1} '{stage.name}'")
        logger.info("gate plot: %s", path)
    if dataset.skipped:
        result.skipped[stage.name] = dict(dataset.skipped)
        logger.warning("stage '%s' skipped samples: %s", stage.name, dict(dataset.skipped))


def check_upcycle(model: MultimodalModel, stages: list[StageConfig]) -> None:
    """A stage that says ``upcycle`` needs a bridge that can (``moe``); say so before any stage trains."""
    for stage in stages:
        if stage.upcycle and not hasattr(model.bridge, "upcycle"):
            raise ValueError(f"stage '{stage.name}' sets upcycle, which copies FFNs into MoE experts, but the "
                             f"bridge ({type(model.bridge).__name__}) has none: use bridge type 'moe'")


def add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    """Sum ``counts`` (numbers or nested lists of numbers) into ``total`` element by element."""
    def plus(left: Any, right: Any) -> Any:
        return [plus(a, b) for a, b in zip(left, right)] if isinstance(left, list) else left + right

    for name, value in counts.items():
        total[name] = plus(total[name], value) if name in total else value


def _region_words(stage: StageConfig, model: MultimodalModel, dataset: Any) -> WordGroups | None:
    """The candidate words of a ``region_words`` stage (checked against the bridge's grid); ``None`` otherwise."""
    if stage.objective != "region_words":
        return None
    check_grid(model)
    return WordGroups.from_samples(dataset.samples, model.tokenizer, where=f"stage '{stage.name}'")


def _next_batch(data: _StageData, cursor: int, world: int, rank: int, stage: str) -> tuple[dict, int, int]:
    """The next micro-batch that holds samples, from position ``cursor`` of the stage's micro-batch stream;
    returns it, the cursor after it, and how many empty ones (every sample skipped) were passed over."""
    passed = 0
    while True:
        batch = data.micro_batch(cursor * world + rank)
        cursor += 1
        if batch is not None:
            return batch, cursor, passed
        passed += 1
        if passed >= data.batches_per_epoch:
            raise ValueError(f"stage '{stage}': {passed} micro-batches in a row had every sample skipped; "
                             f"see the skipped-sample counts (skip_bad_samples) and the data")


def _fp32(frozen: FrozenBf16Weights | None) -> Any:
    """The fp32 weights for the block when a bf16 stage cast frozen ones (code outside autocast)."""
    return frozen.fp32() if frozen is not None else contextlib.nullcontext()


def _set_modes(model: MultimodalModel, stage: StageConfig) -> None:
    """Train mode only for keys that train, so frozen encoders keep BatchNorm statistics and no dropout."""
    for key in MODULE_KEYS:
        model.get_submodule(key).train(stage.spec(key).mode != "frozen")


def _append_log(directory: str, record: dict) -> None:
    with open(os.path.join(directory, "log.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _rewrite_log(directory: str, history: list[dict]) -> None:
    with open(os.path.join(directory, "log.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
