"""Stages as data, and :func:`apply_stage` — the only code that sets ``requires_grad``.

A stage names, per module key (``vision``, ``bridge``, ``llm``), a tuning mode:

* ``frozen`` — no parameter trains (the default for keys a stage does not name);
* ``full`` — every parameter trains;
* ``lora`` — LoRA adapters (peft) are injected once and only they train;
* ``partial`` — the last ``layers`` blocks of the module's layer stack train.

With ``full``, ``only`` narrows the key to some of its parts: parameter-name prefixes inside the
key (``bridge: {mode: full, only: [projector]}`` trains a fusion bridge's projector and not its
experts, as MoE-LLaVA's first stage does).

Each key may carry its own learning rate. :func:`apply_stage` returns (and logs) a
table of trainable/frozen parameter counts per key.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.data.stats import stages_stats
from mmbridge.model.lora import LoraSpec, has_lora
from mmbridge.model.multimodal import MODULE_KEYS, MultimodalModel
from mmbridge.registry import config_from_dict

logger = logging.getLogger("mmbridge")
MODES = ("frozen", "full", "lora", "partial")
OBJECTIVES = ("lm", "region_words", "itc_itm_itg", "denoising")  # what each does: mmbridge.train.objectives
STAGE1_OBJECTIVE = "itc_itm_itg"  # BLIP-2 stage 1: ITC + ITM + ITG for a Q-Former, no LLM (qformer_pretrain.py)
DENOISING_OBJECTIVE = "denoising"  # a text-to-image UNet under a frozen text encoder (denoising.py)


@dataclass
class TuneSpec:
    """How one module key trains in a stage."""

    mode: str = "frozen"
    lr: float | None = None  # None: the stage's lr
    layers: int | None = None  # for partial: how many final layers train
    r: int = 8  # LoRA rank, alpha, dropout and targets (mode lora)
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    only: list[str] | None = None  # for full: parameter-name prefixes inside the key that train

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tuning mode must be one of {MODES}, got {self.mode!r}")
        if self.only is not None and (self.mode != "full" or not self.only):
            raise ValueError(f"'only' narrows mode 'full' to a non-empty list of parts (got mode {self.mode!r}, "
                             f"only {self.only!r})")
        if self.mode == "partial" and not self.layers:
            raise ValueError("tuning mode 'partial' needs 'layers' (how many final layers train)")

    def lora_spec(self) -> LoraSpec:
        spec = LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout)
        if self.target_modules:
            spec.target_modules = list(self.target_modules)
        return spec


@dataclass
class StageConfig:
    """One training stage. ``train`` maps module keys to a mode string or a :class:`TuneSpec` dict.

    ``save_model: true`` writes the model as the stage ends (:func:`stage_model_dir`), a directory
    ``MultimodalModel.from_pretrained`` loads like ``final/``: what a later stage changed can be measured against it
    (NExT-GPT's image→text accuracy before and after its output stages, ``benchmarks/nextgpt.py``)."""

    name: str = "stage"
    train: dict = field(default_factory=lambda: {"bridge": "full"})
    data: dict | None = None  # a DataConfig dict; None: the run's default data
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: float | None = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float | None = 1.0
    precision: str = "bf16"  # bf16 (autocast) | fp32
    save_every: int | None = None  # optimizer steps between checkpoints
    log_every: int = 1
    objective: str = "lm"  # lm: next-token loss on the labels; region_words: bridge-only alignment (region_words.py);
    # itc_itm_itg: BLIP-2 stage 1, a Q-Former without the LLM (qformer_pretrain.py); denoising: an image generator
    # (denoising.py)
    upcycle: bool = False  # MoE-tuning: copy each MoE layer's FFN into its experts as this stage starts (moe bridge)
    save_model: bool = False  # also write the model as this stage ends, to output_dir/stages/<N>-<name> (loadable)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train) - set(MODULE_KEYS))
        if unknown:
            raise ValueError(f"stage '{self.name}': unknown module key(s) {unknown} in 'train'; keys: {list(MODULE_KEYS)}")
        self.train = {key: _tune_spec(self.name, key, value) for key, value in self.train.items()}
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"stage '{self.name}': precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"stage '{self.name}': schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"stage '{self.name}': objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "region_words" and self.spec("llm").mode != "frozen":
            raise ValueError(f"stage '{self.name}': objective 'region_words' never runs the LLM's layers, so "
                             f"train.llm must stay frozen (got {self.spec('llm').mode!r})")
        if self.objective == STAGE1_OBJECTIVE and self.spec("llm").mode != "frozen":
            raise ValueError(f"stage '{self.name}': objective 'itc_itm_itg' (BLIP-2 stage 1) builds no LLM, so "
                             f"train.llm must stay frozen (got {self.spec('llm').mode!r})")
        if self.objective == DENOISING_OBJECTIVE:
            for key, role in (("llm", "the text encoder"), ("vision", "the VAE")):
                if self.spec(key).mode != "frozen":
                    raise ValueError(f"stage '{self.name}': objective 'denoising' trains the UNet (bridge) under a "
                                     f"frozen {key} ({role}), so train.{key} must stay frozen (got "
                                     f"{self.spec(key).mode!r})")
        if self.steps is None and not self.epochs:
            raise ValueError(f"stage '{self.name}' needs 'epochs' or 'steps'")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage '{self.name}': {name} must be >= 1, got {getattr(self, name)}")

    def spec(self, key: str) -> TuneSpec:
        return self.train.get(key, TuneSpec("frozen"))


def stage_model_dir(output_dir: str, index: int, stage: StageConfig) -> str:
    """Where a ``save_model`` stage's model goes: ``output_dir/stages/<index + 1>-<name>`` (characters of the name
    other than letters, digits, ``.``, ``_`` and ``-`` written as ``_``)."""
    return os.path.join(output_dir, "stages", f"{index + 1}-{re.sub(r'[^A-Za-z0-9._-]', '_', stage.name)}")


def _tune_spec(stage: str, key: str, value: Any) -> TuneSpec:
    if isinstance(value, TuneSpec):
        return value
    where = f"stage '{stage}' train.{key}"
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mode string or a mapping, got {value!r}")
    try:
        return config_from_dict(TuneSpec, value, where=where)
    except ValueError as error:
        raise ValueError(error if str(error).startswith(where) else f"{where}: {error}") from None


def stage_from_dict(data: dict | StageConfig) -> StageConfig:
    return data if isinstance(data, StageConfig) else config_from_dict(StageConfig, data, where="stage")


def recipe_stats(run: Any) -> str:
    """``mmbridge data stats``: every stage's mixture table (:func:`~mmbridge.data.stats.stages_stats`), each stage
    with its own data or the recipe's default (``run``: a :class:`~mmbridge.config.RunConfig`)."""
    stages = []
    for index, stage in enumerate(stage_from_dict(stage) for stage in run.stages):
        label = f"stage {index} ({stage.name!r})"
        spec = stage.data if stage.data is not None else run.data
        if spec is None:
            raise ValueError(f"{label} has no data and the recipe has no default 'data'")
        stages.append((label, spec))
    return stages_stats(stages)


def apply_stage(model: MultimodalModel, stage: StageConfig, log: bool = True) -> list[dict]:
    """Set ``requires_grad`` for every parameter as ``stage`` says; returns the per-key table rows."""
    for key in MODULE_KEYS:
        spec = stage.spec(key)
        module = model.get_submodule(key)
        if spec.mode == "lora" and not has_lora(module):
            model.add_lora(key, spec.lora_spec())
        set_trainable(module, spec, where=f"stage '{stage.name}' train.{key}")
    rows = parameter_table(model, stage)
    if log:
        logger.info("stage '%s'\n%s", stage.name, format_table(rows))
    return rows


def set_trainable(module: nn.Module, spec: TuneSpec, where: str = "train") -> None:
    """One module's ``requires_grad`` as ``spec`` says (:func:`apply_stage` calls it per key; benchmarks call it on
    a transformers peer model so both train the same parameters)."""
    module.requires_grad_(spec.mode == "full" and not spec.only)
    if spec.only:
        _train_only(module, spec.only, where)
    elif spec.mode == "lora":
        for name, parameter in module.named_parameters():
            parameter.requires_grad_("lora_" in name)
    elif spec.mode == "partial":
        layers = _layer_stack(module)
        if spec.layers > len(layers):
            raise ValueError(f"partial tuning asks for {spec.layers} layers but the module has {len(layers)}")
        for layer in list(layers)[-spec.layers:]:
            layer.requires_grad_(True)


def _train_only(module: nn.Module, prefixes: list[str], where: str) -> None:
    """Train the parameters whose names (inside ``module``) are or start with one of ``prefixes``."""
    names = [name for name, _ in module.named_parameters()]
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            parts = sorted({name.split(".", 1)[0] for name in names})
            raise ValueError(f"{where}: 'only' names {prefix!r}, which holds no parameter; parts: {parts}")
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes))


def _layer_stack(module: nn.Module) -> nn.ModuleList:
    """The longest ``nn.ModuleList`` inside ``module`` (the transformer blocks)."""
    stacks = [sub for sub in module.modules() if isinstance(sub, nn.ModuleList)]
    if not stacks:
        raise ValueError(f"partial tuning needs a layer stack (nn.ModuleList) inside {type(module).__name__}")
    return max(stacks, key=len)


def parameter_table(model: MultimodalModel, stage: StageConfig) -> list[dict]:
    """One row per module key that holds parameters (a text-only model has no ``output`` row)."""
    counts = model.parameter_counts()
    return [{"key": key, "mode": stage.spec(key).mode, **counts[key]} for key in MODULE_KEYS
            if counts[key]["trainable"] + counts[key]["frozen"] or stage.spec(key).mode != "frozen"]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: key | mode | trainable | frozen."""
    lines = [f"{'key':<8}{'mode':<9}{'trainable':>14}{'frozen':>14}"]
    for row in rows:
        lines.append(f"{row['key']:<8}{row['mode']:<9}{row['trainable']:>14,}{row['frozen']:>14,}")
    total_trainable = sum(row["trainable"] for row in rows)
    total_frozen = sum(row["frozen"] for row in rows)
    lines.append(f"{'total':<17}{total_trainable:>14,}{total_frozen:>14,}")
    return "\n".join(lines)


def optimizer_groups(model: MultimodalModel, stage: StageConfig) -> tuple[list[dict], list[str]]:
    """AdamW parameter groups, one per trainable key with its learning rate; plus the ordered parameter names."""
    groups, names = [], []
    for key in MODULE_KEYS:
        named = [(name, p) for name, p in model.named_parameters() if name.split(".", 1)[0] == key and p.requires_grad]
        if not named:
            continue
        groups.append({"params": [p for _, p in named], "lr": stage.spec(key).lr or stage.lr,
                       "weight_decay": stage.weight_decay, "key": key})
        names.extend(name for name, _ in named)
    if not groups:
        raise ValueError(f"stage '{stage.name}' trains nothing: name at least one key with a mode other than 'frozen'")
    return groups, names


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warmup then cosine decay to 0 (or constant): a multiplier on each group's lr."""
    warmup = max(0, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast(precision: str, device: torch.device):
    """bf16 autocast context (or a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
