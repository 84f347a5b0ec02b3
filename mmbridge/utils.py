"""Small shared helpers: atomic file writes, seeding, temporary eval mode."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on failure it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        make_shareable(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def make_shareable(path: str) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (rw-r--r-- / rwxr-xr-x under umask 022).

    ``tempfile`` creates files 0600 and directories 0700; written files keep that mode through a
    rename, so models and caches written atomically would be unreadable to other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block (no dropout, fixed BatchNorm statistics), then each one's
    own ``training`` flag restored."""
    flags = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in flags.items():
            sub.training = training
