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
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from mmbridge.config import RunConfig, save_run_config
from mmbridge.data import DataConfig, MixtureDataset, batch_indices, collate
from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.data.loader import MicroBatches
from mmbridge.model.multimodal import MODULE_KEYS
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.distributed import any_process, check_launch, gather, make_accelerator, micro_seed
from mmbridge.train.feature_cache import CachedFeatureDataset, build_feature_cache
from mmbridge.train.interrupt import StopOnInterrupt, TrainingInterrupted
from mmbridge.train.objectives import build_model, stage_batching, stage_objective
from mmbridge.train.precision import FrozenBf16Weights, frozen_weights_in_bf16, resolve_precision
from mmbridge.train.preflight import check_run, stage_data
from mmbridge.train.recipe import (StageConfig, apply_stage, autocast, format_table, lr_lambda, optimizer_groups,
                                   stage_model_dir)
from mmbridge.train.sharding import FullyShardedStage, is_fully_sharded, shard_stage
from mmbridge.utils import seed_everything

logger = logging.getLogger("mmbridge")
StepCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    """The trained model (a :class:`~mmbridge.model.multimodal.MultimodalModel`, or BLIP-2 stage 1's
    :class:`~mmbridge.train.qformer_pretrain.QFormerPretrainModel`), the per-step log, and samples skipped per stage
    (by reason)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    output_dir: str = ""
    main_process: bool = True  # False in every process but the main one of a multi-process run


class _StageData:
    """Deterministic micro-batches of one stage: micro-batch ``m`` → (epoch, batch) → collated tensors;
    :meth:`stream` builds them in ``num_workers`` worker processes (:mod:`mmbridge.data.loader`). A micro-batch
    left with fewer than ``min_samples`` samples (skipped ones, an epoch's short last batch) is ``None``."""

    def __init__(self, dataset: MixtureDataset, stage: StageConfig, seed: int, pad_token_id: int,
                 group_by_length: bool, num_workers: int = 0, min_samples: int = 1) -> None:
        self.dataset, self.stage, self.seed, self.pad_token_id = dataset, stage, seed, pad_token_id
        self.group_by_length, self.num_workers, self.min_samples = group_by_length, num_workers, min_samples
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
        return collate(examples, self.pad_token_id) if examples and len(examples) >= self.min_samples else None

    def stream(self, world: int) -> MicroBatches:
        """This process's micro-batches (every ``world``-th), in order, built by the stage's loader workers."""
        return MicroBatches(self, world, self.num_workers)


def train(run: RunConfig, resume: bool = False, progress: bool = True,
          on_step: StepCallback | None = None, model: nn.Module | None = None) -> TrainResult:
    """Run every stage of ``run``; with ``resume``, continue from the newest checkpoint in ``run.output_dir``.

    The recipe is checked first (:func:`~mmbridge.train.preflight.check_run`), and a resumed run
    must use the recipe its checkpoint was trained with. Ctrl-C stops after the current step,
    writes a checkpoint and raises :class:`~mmbridge.train.interrupt.TrainingInterrupted`.
    The model is a :class:`MultimodalModel`, or BLIP-2 stage 1's Q-Former for a recipe whose stages train
    ``itc_itm_itg`` (:func:`~mmbridge.train.objectives.build_model`).

    Under ``accelerate launch``/``torchrun`` every process runs this; the main one writes the log,
    checkpoints and the final model (:mod:`~mmbridge.train.distributed`).
    """
    check_launch()
    stages = check_run(run)
    session = _Session(run, make_accelerator(), progress, on_step)
    if resume:
        session.resume_from_latest()
    seed_everything(run.seed)
    model = (model or build_model(run, stages)).to(session.accelerator.device)
    session.result = TrainResult(model, session.state.history, output_dir=run.output_dir,
                                 main_process=session.accelerator.is_main_process)
    if session.accelerator.is_main_process:
        os.makedirs(run.output_dir, exist_ok=True)
        save_run_config(run, os.path.join(run.output_dir, "recipe.yaml"))
        _rewrite_log(run.output_dir, session.state.history)
    for stage in stages:  # what a stage asks of the bridge (MoE upcycling), before any stage trains
        model.bridge.check_stage(stage)
    for index, stage in enumerate(stages):
        rows = session.enter_stage(model, index, stage)
        if index < session.state.stage_index:
            continue  # trained before the checkpoint this run resumes from
        table = f"stage {index + 1}/{len(stages)} '{stage.name}'\n{format_table(rows)}"
        tqdm.write(table) if progress else logger.info(table)
        _StageRun(session, index, stage, model).run()
        session.state.stage_index, session.state.step, session.state.micro = index + 1, 0, None
    session.save_final(model, len(stages))
    return session.result


@dataclass
class _Session:
    """What the stages of one :func:`train` call share: the recipe, the accelerator, where the run stands (and
    the checkpoint it resumes from), the result being filled and every parameter that has trained so far."""

    run: RunConfig
    accelerator: Any
    progress: bool
    on_step: StepCallback | None
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    saved: dict | None = None  # the state.json of the checkpoint this run resumes from
    saved_path: str | None = None
    touched: set[str] = field(default_factory=set)  # parameters that trained in a stage so far (checkpointed)
    result: TrainResult | None = None

    def resume_from_latest(self) -> None:
        """Take the newest checkpoint of ``output_dir`` as the starting point, after checking that it was trained
        with this recipe and (mid-stage) on as many processes."""
        checkpoint_dir = os.path.join(self.run.output_dir, "checkpoints")
        self.saved_path = ckpt.latest_checkpoint(checkpoint_dir)
        if self.saved_path is None:
            logger.warning("--resume: no checkpoint in %s; starting from scratch", checkpoint_dir)
            return
        ckpt.check_recipe_unchanged(os.path.join(self.run.output_dir, "recipe.yaml"), self.run.to_dict(),
                                    self.saved_path)
        self.saved = ckpt.read_state(self.saved_path)
        self.state = ckpt.saved_state(self.saved)
        check_world_size(self.state, self.accelerator.num_processes, self.saved_path)
        logger.info("resuming from %s (stage %d, step %d)", self.saved_path, self.state.stage_index, self.state.step)

    def resumes_mid_stage(self, index: int) -> bool:
        """Whether stage ``index`` goes on from a checkpoint taken inside it."""
        return self.saved is not None and index == self.saved["stage_index"] and self.saved["step"] > 0

    def resumes_at_start_of(self, index: int) -> bool:
        """Whether the run resumes from a checkpoint taken as stage ``index`` began (the end of the one before)."""
        return self.saved is not None and index == self.saved["stage_index"] and self.saved["step"] == 0

    def enter_stage(self, model: nn.Module, index: int, stage: StageConfig) -> list[dict]:
        """Bring ``model`` to the start of stage ``index`` -- a checkpoint taken at its boundary restored (before
        its LoRA init), its MoE upcycling, its trainable parameters set -- whether it trains or was trained before
        the resumed checkpoint; returns the stage's parameter table."""
        if self.resumes_at_start_of(index):  # the checkpoint's stage, not where the run is now
            ckpt.load_trainable(self.saved_path, model)
            ckpt.restore_rng(self.saved_path, self.saved)
        model.bridge.start_stage(stage)  # e.g. MoE upcycling: copies the FFNs as trained so far
        rows = apply_stage(model, stage, log=False)
        self.touched |= {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        self.touched |= {f"bridge.{name}" for name in model.bridge.tracked_parameters()}  # e.g. an EMA
        return rows

    def save_final(self, model: nn.Module, stage_count: int) -> None:
        """Write ``output_dir/final`` (the main process; the others wait for it); a run resumed after its last
        stage had finished takes the checkpoint's weights first."""
        if self.saved is not None and self.saved["stage_index"] >= stage_count:  # every stage had finished
            ckpt.load_trainable(self.saved_path, model)
            logger.info("every stage had finished in %s: nothing left to train", self.saved_path)
        final = os.path.join(self.run.output_dir, "final")
        if self.accelerator.is_main_process:
            model.save_pretrained(final)
            logger.info("saved the trained model to %s", final)
        self.accelerator.wait_for_everyone()  # every process returns once the model is saved


def check_world_size(state: ckpt.TrainState, processes: int, checkpoint: str) -> None:
    """A checkpoint taken mid-stage resumes only on as many processes as wrote it: which micro-batches each
    process reads, and how many steps an epoch-long stage takes, depend on it."""
    if state.step > 0 and state.world_size != processes:
        raise ValueError(f"cannot resume from {checkpoint} on {processes} process(es): it was taken mid-stage by a "
                         f"run on {state.world_size}; resume with {state.world_size} (or from a stage boundary)")


def _stage_data(run: RunConfig, index: int, stage: StageConfig, model: nn.Module, precision: str,
                accelerator: Any, progress: bool) -> tuple[_StageData, MixtureDataset | CachedFeatureDataset]:
    data_config = stage_data(run, index, stage)
    processor = stage_processor(model, data_config, stage.name, stage.objective)
    # the box format the model learns is saved with it (processor.json), so evaluation asks in that format
    if data_config.box_format == "plain":
        model.processor_settings.pop("box_format", None)
    else:
        model.processor_settings["box_format"] = data_config.box_format
    dataset = MixtureDataset(data_config, processor)
    if data_config.feature_cache and stage.spec("vision").mode == "frozen":
        with accelerator.main_process_first():  # the main process computes; the others then open it
            cache = build_feature_cache(data_config.feature_cache, dataset, model.vision, precision,
                                        progress=progress and accelerator.is_main_process)
        dataset = CachedFeatureDataset(dataset, cache)
    batching = stage_batching(stage, data_config)
    return _StageData(dataset, stage, run.seed * 1000 + index, processor.pad_token_id, batching.group_by_length,
                      data_config.num_workers, batching.min_samples), dataset


def stage_processor(model: nn.Module, data: DataConfig, stage: str, objective: str = "lm") -> Any:
    """The model's processor with a stage's data settings (``max_length``, ``template``, ``prefix_lm``,
    ``box_format``); a ``region_words`` stage reads no text, so its examples carry images and regions only.
    (BLIP-2 stage 1's model gives its caption processor; preflight refused the settings it does not read.)"""
    overrides: dict[str, Any] = {"max_length": data.max_length} if data.max_length else {}
    overrides["box_format"] = data.box_format  # the stage's, over a format the model was saved with
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


class _StageRun:
    """One stage that trains: its data, objective, optimizer and schedule (restored mid-stage when the run resumes
    inside it), wrapped for DDP or sharded for FSDP; :meth:`run` trains its remaining steps."""

    def __init__(self, session: _Session, index: int, stage: StageConfig, model: nn.Module) -> None:
        self.session, self.index, self.stage, self.model = session, index, stage, model
        accelerator, state = session.accelerator, session.state
        mid_stage = session.saved if session.resumes_mid_stage(index) else None
        self.precision = resolve_precision(stage.precision, accelerator.device)
        self.data, self.dataset = _stage_data(session.run, index, stage, model, self.precision, accelerator,
                                              session.progress)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        micro_per_step = stage.grad_accum * self.world
        self.total_steps = stage.steps or math.ceil(stage.epochs * self.data.batches_per_epoch / micro_per_step)
        objective = stage_objective(stage, model, self.dataset)
        # FSDP shards before the optimizer is built, whose groups then hold the sharded parameters
        self.fsdp = shard_stage(session.run.distributed.strategy, objective, model, accelerator, self.precision)
        groups, self.param_names = optimizer_groups(model, stage)
        optimizer = torch.optim.AdamW(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.total_steps, stage.warmup_ratio,
                                                                                stage.schedule))
        self.start = 0
        if mid_stage is not None:
            self.start = ckpt.restore_mid_stage(session.saved_path, mid_stage, model, optimizer, self.param_names,
                                                self.scheduler)
        self.cursor = _start_cursor(state, mid_stage, self.start * stage.grad_accum, self.rank)
        if self.fsdp is not None:
            self.trained = self.fsdp.root
        else:  # DDP: gradients averaged
            self.trained = accelerator.prepare_model(objective) if self.world > 1 else objective
        self.optimizer = accelerator.prepare_optimizer(optimizer)
        _set_modes(model, stage)
        self.trainable = [parameter for group in groups for parameter in group["params"]]

    def run(self) -> None:
        """Train the stage's remaining steps, then hand back a whole model; a Ctrl-C (in any process) stops every
        process after the same step with a checkpoint and raises :class:`TrainingInterrupted`."""
        accelerator = self.session.accelerator
        bar = tqdm(total=self.total_steps, initial=self.start, desc=self.stage.name, dynamic_ncols=True,
                   disable=not self.session.progress or not accelerator.is_main_process)
        grace = _SIGINT_GRACE if self.world > 1 else 0.0
        cast = self.precision if self.fsdp is None else "fp32"  # FSDP holds the weights as shards: no bf16 cast
        with frozen_weights_in_bf16(self.model, cast, self.session.touched) as frozen, \
                StopOnInterrupt(grace) as stop, self.data.stream(self.world) as stream:  # workers live for the stage
            for step in range(self.start, self.total_steps):
                record = self.step(step, stream)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                bar.update(1)
                self.after_step(step, record, frozen, stop, bar)
        bar.close()
        self.finish()

    def step(self, step: int, stream: MicroBatches) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches of every process; returns its log record (logged)."""
        accelerator, state, stage = self.session.accelerator, self.session.state, self.stage
        began = time.perf_counter()
        tally = _Tally()
        for micro in range(stage.grad_accum):  # grad_accum micro-batches that hold samples
            batch, self.cursor, skipped = _next_batch(stream, self.cursor, self.world, self.rank, stage.name)
            tally.empty += skipped
            last = micro == stage.grad_accum - 1
            with _no_sync(self.trained, self.world > 1 and not last), autocast(self.precision, accelerator.device):
                with _seeded(micro_seed(self.data.seed, (self.cursor - 1) * self.world + self.rank),
                             accelerator.device):
                    loss, labelled, extra = self.trained(_on_device(batch, accelerator.device))
                accelerator.backward(loss / stage.grad_accum)
            tally.add(batch, float(loss.detach()), labelled, extra)
        tally.cursor = self.cursor
        tallies = gather(accelerator, tally)  # every process's figures, in rank order
        if self.fsdp is not None:
            self.fsdp.finish_backward()  # a parameter no process used gets no gradient, as under DDP
        grad_norm = _clip(accelerator, self.fsdp, self.trainable, stage.max_grad_norm) if stage.max_grad_norm \
            else None
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.model.bridge.after_update(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step, state.global_step = step + 1, state.global_step + 1
        state.micro = self.cursor if self.world == 1 else [part.cursor for part in tallies]  # one per process
        seconds = max(time.perf_counter() - began, 1e-9)
        record = _step_record(stage, self.index, step, self.total_steps, state.global_step, learning_rate,
                              _Tally.merged(tallies), seconds)
        if grad_norm is not None:  # before clipping; the same in every process (gradients are averaged first)
            record["grad_norm"] = float(grad_norm)
        record.update(self.model.bridge.step_report())  # e.g. the tanh gates of gated cross-attention
        self.session.result.history.append(record)
        if accelerator.is_main_process:
            _append_log(self.session.run.output_dir, record)
        return record

    def after_step(self, step: int, record: dict, frozen: FrozenBf16Weights | None, stop: StopOnInterrupt,
                   bar: Any) -> None:
        """A checkpoint when one is due, the caller's callback, and the stop every process makes after this step
        when a Ctrl-C reached any of them."""
        stage_done = step + 1 == self.total_steps
        due = stage_done or bool(self.stage.save_every and (step + 1) % self.stage.save_every == 0)  # everywhere
        written = self.save(step, stage_done, frozen) if due else None
        if self.session.on_step is not None:
            with _fp32(frozen):
                self.session.on_step(record)
        if any_process(self.session.accelerator, stop.requested):  # every process stops after the same step
            bar.close()
            written = written if due else self.save(step, stage_done, frozen)
            self.session.accelerator.wait_for_everyone()  # the checkpoint is written before any process exits
            if self.fsdp is not None:
                self.fsdp.gather()  # the caller gets a whole model
            state = self.session.state
            raise TrainingInterrupted(
                f"stopped at step {step + 1} of {self.total_steps} of stage '{self.stage.name}' ({state.global_step} "
                f"steps in all); checkpoint {written or 'written by the main process'}; resume with --resume", written)

    def save(self, step: int, stage_done: bool, frozen: FrozenBf16Weights | None) -> str | None:
        """A checkpoint after ``step`` (the next stage's start when the stage is done); its path in the process
        that writes it, ``None`` elsewhere. Under FSDP every process takes part in gathering the weights."""
        accelerator, state, world = self.session.accelerator, self.session.state, self.world
        if not accelerator.is_main_process and self.fsdp is None:
            return None
        history = self.session.result.history
        where = ckpt.TrainState(self.index + 1, 0, state.global_step, history, world_size=world) if stage_done \
            else ckpt.TrainState(self.index, step + 1, state.global_step, history, state.micro, world)
        with _fp32(frozen):
            return ckpt.save_checkpoint(os.path.join(self.session.run.output_dir, "checkpoints"), self.model,
                                        self.session.touched, self.optimizer, self.param_names, self.scheduler,
                                        where, write=accelerator.is_main_process)

    def finish(self) -> None:
        """After the last step: full plain parameters again (FSDP), eval mode, the stage's optimizer and DDP
        wrapper freed, the bridge's plots (Flamingo's gates), and the samples it skipped."""
        accelerator, run, stage, index = self.session.accelerator, self.session.run, self.stage, self.index
        if self.fsdp is not None:
            self.fsdp.gather()  # full, plain parameters again: for the next stage, final/ and the caller
        self.model.eval()
        accelerator.free_memory()  # drops the stage's DDP wrapper (its hooks and buckets) and optimizer
        stage_records = [record for record in self.session.result.history if record["stage_index"] == index]
        if accelerator.is_main_process:
            for path in self.model.bridge.write_plots(stage_records, run.output_dir, index + 1, stage.name):
                logger.info("plot: %s", path)
            if stage.save_model:
                directory = stage_model_dir(run.output_dir, index, stage)
                self.model.save_pretrained(directory)
                logger.info("saved the model as stage '%s' ended to %s", stage.name, directory)
        if stage.save_model:
            accelerator.wait_for_everyone()  # the others go on once the stage's model is written
        if self.dataset.skipped:
            self.session.result.skipped[stage.name] = dict(self.dataset.skipped)
            logger.warning("stage '%s' skipped samples: %s", stage.name, dict(self.dataset.skipped))


_SIGINT_GRACE = 2.0  # seconds: torchrun forwards the terminal's Ctrl-C to processes that received it already


@dataclass
class _Tally:
    """One process's figures for one optimizer step; :meth:`merged` combines every process's into the step's."""

    losses: list[float] = field(default_factory=list)  # per micro-batch, in order
    samples: int = 0
    seen: int = 0  # positions through the LLM
    tokens: int = 0  # labelled tokens (cells for region_words)
    empty: int = 0  # micro-batches passed over: every sample skipped, or fewer than the objective takes
    aux: dict[str, float] = field(default_factory=dict)  # a fusion bridge's auxiliary loss terms, summed
    counts: dict[str, Any] = field(default_factory=dict)  # and its statistics (counts), summed likewise
    read: dict[str, list[int]] = field(default_factory=dict)  # region_words: attribute → [cells read right, labelled]
    parts: dict[str, float] = field(default_factory=dict)  # the loss's named terms (stage 1: itc, itm, itg), summed
    cursor: int = 0  # the process's position in the stage's micro-batch stream after the step

    def add(self, batch: dict, loss: float, labelled: int, extra: dict[str, Any]) -> None:
        self.losses.append(loss)
        self.samples += batch["input_ids"].shape[0]
        self.seen += extra.get("positions", 0)
        self.tokens += labelled
        for name, value in extra.get("aux", {}).items():
            self.aux[name] = self.aux.get(name, 0.0) + float(value.detach())
        for name, value in extra.get("parts", {}).items():
            self.parts[name] = self.parts.get(name, 0.0) + float(value.detach())
        add_counts(self.counts, extra.get("stats", {}))
        for name, (right, total) in extra.get("read", {}).items():
            sums = self.read.setdefault(name, [0, 0])
            sums[0], sums[1] = sums[0] + right, sums[1] + total

    @staticmethod
    def merged(parts: list["_Tally"]) -> "_Tally":
        """The step's figures: losses in micro-batch order (micro-batch ``a`` of rank ``r`` is ``a·world + r`` of
        the step), so one process summing N micro-batches and N processes give the same float; the rest summed."""
        whole = _Tally(losses=[loss for losses in zip(*(part.losses for part in parts)) for loss in losses])
        for part in parts:
            whole.samples, whole.seen = whole.samples + part.samples, whole.seen + part.seen
            whole.tokens, whole.empty = whole.tokens + part.tokens, whole.empty + part.empty
            for name, value in part.aux.items():
                whole.aux[name] = whole.aux.get(name, 0.0) + value
            for name, value in part.parts.items():
                whole.parts[name] = whole.parts.get(name, 0.0) + value
            add_counts(whole.counts, part.counts)
            for name, (right, total) in part.read.items():
                sums = whole.read.setdefault(name, [0, 0])
                sums[0], sums[1] = sums[0] + right, sums[1] + total
        return whole


def _step_record(stage: StageConfig, index: int, step: int, total_steps: int, global_step: int,
                 learning_rate: float, tally: _Tally, seconds: float) -> dict:
    """The log record of one step from every process's merged figures: the loss is the mean over the step's
    micro-batches, rates count every process's samples and positions over the step's ``seconds``."""
    micro_batches = len(tally.losses)
    loss_sum = 0.0
    for loss in tally.losses:  # summed in micro-batch order, as one process does
        loss_sum += loss
    record = {"stage": stage.name, "stage_index": index, "step": step + 1, "stage_steps": total_steps,
              "global_step": global_step, "loss": loss_sum / micro_batches, "lr": learning_rate,
              "samples_per_s": tally.samples / seconds, "tokens_per_s": tally.seen / seconds,
              "label_tokens": tally.tokens, "seconds": seconds}
    if tally.read:  # how often each visual token reads as its region's word, per attribute
        record["word_accuracy"] = {name: right / total for name, (right, total) in tally.read.items() if total}
    if tally.aux:  # already inside "loss"
        record["aux_losses"] = {name: value / micro_batches for name, value in tally.aux.items()}
    record.update({name: value / micro_batches for name, value in tally.parts.items()})  # their sum is "loss"
    record.update(tally.counts)
    if tally.empty:
        record["empty_batches"] = tally.empty  # every sample skipped (or fewer left than the objective takes)
    return record


def _start_cursor(state: ckpt.TrainState, saved: dict | None, default: int, rank: int) -> int:
    """Where this process's micro-batch stream resumes: the checkpoint's position (one per process when several
    ran), else ``default``."""
    if saved is None or state.micro is None:
        return default
    return state.micro[rank] if isinstance(state.micro, list) else state.micro


def _no_sync(trained: nn.Module, skip: bool) -> Any:
    """DDP's ``no_sync`` for micro-batches before a step's last (gradients accumulate locally, one all-reduce);
    FSDP's counterpart likewise (one reduce-scatter per step)."""
    if is_fully_sharded(trained):
        trained.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()
    return trained.no_sync() if skip else contextlib.nullcontext()


def _clip(accelerator: Any, fsdp: FullyShardedStage | None, parameters: list[torch.Tensor], max_norm: float) -> Any:
    """Clip gradients to ``max_norm`` (sharded ones under FSDP); returns the norm before clipping."""
    if fsdp is not None:
        return fsdp.clip_grad_norm(parameters, max_norm)
    return accelerator.clip_grad_norm_(parameters, max_norm)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG seeded to ``seed``, then put the RNG back as it was."""
    devices, kind = ([], "cuda") if device.type == "cpu" else ([device], device.type)  # the CPU's RNG is always forked
    with torch.random.fork_rng(devices=devices, device_type=kind):
        torch.manual_seed(seed)
        yield


def _on_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device``: plain, inside per-modality mappings (``output_pixels``) and in
    :class:`~mmbridge.data.bridge_inputs.BridgeInputs`; ids, regions and captions stay as they are."""
    def moved(value: Any) -> Any:
        if isinstance(value, (torch.Tensor, BridgeInputs)):
            return value.to(device)
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        return value

    return {key: moved(value) for key, value in batch.items()}


def add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    """Sum ``counts`` (numbers or nested lists of numbers) into ``total`` element by element."""
    def plus(left: Any, right: Any) -> Any:
        return [plus(a, b) for a, b in zip(left, right)] if isinstance(left, list) else left + right

    for name, value in counts.items():
        total[name] = plus(total[name], value) if name in total else value


def _next_batch(data: MicroBatches, cursor: int, world: int, rank: int, stage: str) -> tuple[dict, int, int]:
    """The next micro-batch that holds samples, from position ``cursor`` of the stage's micro-batch stream;
    returns it, the cursor after it, and how many empty ones (every sample skipped, or fewer than the objective
    takes) were passed over."""
    passed = 0
    while True:
        batch = data.micro_batch(cursor * world + rank)
        cursor += 1
        if batch is not None:
            return batch, cursor, passed
        passed += 1
        if passed >= data.batches_per_epoch:
            raise ValueError(f"stage '{stage}': {passed} micro-batches in a row had every sample skipped (or fewer "
                             f"left than the objective takes); see the skipped-sample counts (skip_bad_samples) and "
                             f"the data")


def _fp32(frozen: FrozenBf16Weights | None) -> Any:
    """The fp32 weights for the block when a bf16 stage cast frozen ones (code outside autocast)."""
    return frozen.fp32() if frozen is not None else contextlib.nullcontext()


def _set_modes(model: nn.Module, stage: StageConfig) -> None:
    """Train mode only for keys that train, so frozen encoders keep BatchNorm statistics and no dropout."""
    for key in MODULE_KEYS:
        model.get_submodule(key).train(stage.spec(key).mode != "frozen")


def _append_log(directory: str, record: dict) -> None:
    with open(os.path.join(directory, "log.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _rewrite_log(directory: str, history: list[dict]) -> None:
    with open(os.path.join(directory, "log.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
