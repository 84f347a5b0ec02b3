"""Training checkpoints: safetensors + JSON only (no pickle), written atomically.

A checkpoint directory ``step-XXXXXXXX`` holds

* ``trainable.safetensors`` — every parameter that has trained in any stage so far
  (frozen weights are rebuilt from the recipe, so checkpoints stay small);
* ``optimizer.safetensors`` — AdamW moments per parameter, and torch's RNG state;
* ``state.json`` — stage index, step within the stage, scheduler position,
  optimizer hyper-parameters, Python/numpy RNG states and the loss history.

It is written into a temporary directory and renamed into place, so a run killed
while saving leaves the previous checkpoint intact. Under FSDP every process takes part
in gathering the full tensors and the main process writes the same files as an
unsharded run; loading gives each process its own shard.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmbridge.train.sharding import full, load_full, shard_like
from mmbridge.utils import atomic_write_json, make_shareable

PREFIX = "step-"


@dataclass
class TrainState:
    """Where a run is: stage ``stage_index``, ``step`` optimizer steps into it; ``global_step`` across stages."""

    stage_index: int = 0
    step: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    micro: int | list[int] | None = None  # micro-batches the stage has consumed (more than step × grad_accum when
    # some were empty); one position per process when several ran
    world_size: int = 1  # processes that trained


def save_checkpoint(directory: str, model: torch.nn.Module, touched: set[str], optimizer: torch.optim.Optimizer,
                    param_names: list[str], scheduler: Any, state: TrainState, keep: int = 2,
                    write: bool = True) -> str | None:
    """Write a checkpoint under ``directory``; keeps the newest ``keep``. Returns its path.

    With sharded (FSDP) parameters every process calls this to gather the full tensors, and only the one
    with ``write`` writes (the others get ``None``)."""
    named = dict(model.named_parameters())
    weights = {name: full(named[name].detach()).contiguous() for name in sorted(touched)}
    tensors, groups = _optimizer_tensors(optimizer, param_names)
    if not write:
        return None
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"{PREFIX}{state.global_step:08d}")
    staging = tempfile.mkdtemp(dir=directory, prefix=".staging-")
    try:
        save_file(weights, os.path.join(staging, "trainable.safetensors"))
        tensors["__rng__.torch"] = torch.get_rng_state()
        save_file(tensors, os.path.join(staging, "optimizer.safetensors"))
        numpy_state = np.random.get_state()
        atomic_write_json(os.path.join(staging, "state.json"), {
            "stage_index": state.stage_index, "step": state.step, "global_step": state.global_step,
            "micro": state.micro, "world_size": state.world_size, "history": state.history,
            "scheduler_last_epoch": scheduler.last_epoch,
            "param_groups": groups,
            "param_names": param_names, "python_rng": _jsonable(random.getstate()),
            "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        })
        if os.path.exists(final):
            shutil.rmtree(final)
        make_shareable(staging)
        os.replace(staging, final)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    _prune(directory, keep)
    return final


def saved_state(saved: dict) -> TrainState:
    """The :class:`TrainState` recorded in a checkpoint's ``state.json``."""
    return TrainState(saved["stage_index"], saved["step"], saved["global_step"], saved["history"], saved.get("micro"),
                      saved.get("world_size", 1))


def check_recipe_unchanged(recipe_path: str, current: dict, checkpoint: str) -> None:
    """Refuse to resume when the recipe differs from the one the checkpoint was trained with.

    ``current`` is the resolved recipe (``RunConfig.to_dict()``); ``output_dir``, ``distributed`` (DDP or
    FSDP write the same checkpoint files), the stages' ``save_every``/``log_every`` and ``data.num_workers``
    (loader workers) may change (they do not change what is trained). The error lists every other
    difference as ``path: old → new``.
    """
    import yaml

    if not os.path.isfile(recipe_path):
        return
    with open(recipe_path) as handle:
        previous = yaml.safe_load(handle) or {}
    current = yaml.safe_load(yaml.safe_dump(current, sort_keys=False))  # the same normal form as the saved file
    changes = [f"{path}: {old!r} → {new!r}" for path, old, new in _differences(previous, current)
               if path.split(".", 1)[0] not in RESUME_MAY_CHANGE_SECTIONS
               and path.rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE]
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ValueError(f"cannot resume from {checkpoint}: the recipe differs from the one it was trained with "
                         f"({recipe_path}): {shown}. Resume with that recipe, or train into a new output_dir")


RESUME_MAY_CHANGE = ("save_every", "log_every", "num_workers")  # loader workers change speed, not the batches
RESUME_MAY_CHANGE_SECTIONS = ("output_dir", "distributed")  # top-level recipe sections


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted paths where two YAML documents differ, with the values on each side."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [key for key in new if key not in old]:
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [item for index, (a, b) in enumerate(zip(old, new)) for item in _differences(a, b, f"{path}.{index}")]
    return [] if old == new else [(path, old, new)]


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete checkpoint under ``directory`` (staging directories are ignored)."""
    if not os.path.isdir(directory):
        return None
    names = sorted(name for name in os.listdir(directory) if name.startswith(PREFIX))
    return os.path.join(directory, names[-1]) if names else None


def read_state(path: str) -> dict:
    with open(os.path.join(path, "state.json")) as handle:
        return json.load(handle)


def load_trainable(path: str, model: torch.nn.Module) -> set[str]:
    """Copy the checkpoint's parameters into ``model``; returns their names. Unknown names are an error."""
    tensors = load_file(os.path.join(path, "trainable.safetensors"))
    named = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(named))
    if unknown:
        raise ValueError(f"checkpoint {path} has parameters the model lacks: {unknown[:5]} (recipe changed?)")
    for name, tensor in tensors.items():
        load_full(named[name], tensor)
    return set(tensors)


def restore_optimizer(path: str, optimizer: torch.optim.Optimizer, param_names: list[str], saved: dict) -> None:
    """Load AdamW state and hyper-parameters saved by :func:`save_checkpoint`."""
    if saved["param_names"] != param_names:
        raise ValueError(f"checkpoint {path} was taken with other trainable parameters; was the recipe changed?")
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    index = {name: position for position, name in enumerate(param_names)}
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("__rng__"):
            continue
        name, slot = key.rsplit("::", 1)
        state.setdefault(index[name], {})[slot] = shard_like(tensor, parameters[index[name]])  # FSDP: its shard
    groups, start = [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        count = len(group["params"])
        groups.append({**saved_group, "params": list(range(start, start + count))})
        start += count
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_mid_stage(path: str, saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      param_names: list[str], scheduler: Any) -> int:
    """Weights, AdamW state, schedule position and RNG of a mid-stage checkpoint; returns the step to go on from."""
    load_trainable(path, model)
    restore_optimizer(path, optimizer, param_names, saved)
    restore_rng(path, saved)
    scheduler.last_epoch = saved["scheduler_last_epoch"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return int(saved["step"])


def restore_rng(path: str, saved: dict) -> None:
    """Restore torch, Python and numpy RNG states saved with the checkpoint."""
    torch.set_rng_state(load_file(os.path.join(path, "optimizer.safetensors"))["__rng__.torch"])
    random.setstate(_tupled(saved["python_rng"]))
    numpy_state = saved["numpy_rng"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))


def _optimizer_tensors(optimizer: torch.optim.Optimizer, param_names: list[str]) -> tuple[dict, list[dict]]:
    state_dict = optimizer.state_dict()
    tensors = {}
    for position, slots in state_dict["state"].items():
        for slot, value in slots.items():
            tensors[f"{param_names[position]}::{slot}"] = full(torch.as_tensor(value)).contiguous()
    groups = [{key: value for key, value in group.items() if key != "params"} for group in state_dict["param_groups"]]
    return tensors, groups


def _jsonable(value: Any) -> Any:
    return [_jsonable(item) for item in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value


def _prune(directory: str, keep: int) -> None:
    names = sorted(name for name in os.listdir(directory) if name.startswith(PREFIX))
    for name in names[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
