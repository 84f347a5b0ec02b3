"""Any ``nn.Module`` that maps images to a feature grid or a token sequence, as a vision encoder.

:class:`ModuleVisionEncoder` adapts a module's output to ``[B, N, D_v]``:

* ``layout="grid"`` — the module returns ``[B, C, h, w]`` (a CNN trunk); cells become tokens in
  row-major order, ``[B, h*w, C]``;
* ``layout="tokens"`` — the module already returns ``[B, N, C]``; it is passed through.

The registry entry ``"module"`` builds the module from an import path
(``"package.module:ClassOrFactory"``) and keyword arguments, so a saved model is rebuilt from
its config and the saved weights restore the parameters. :func:`wrap_module` wraps a module you
already hold, without the registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder
from mmbridge.model.vision.transform import ImageTransform
from mmbridge.utils import eval_mode

LAYOUTS = ("grid", "tokens")


@dataclass
class ModuleVisionConfig:
    """A module built by ``target(**kwargs)``, read as a ``layout`` of ``feature_dim`` channels.

    ``target`` is ``"package.module:ClassOrFactory"`` (the part after the colon may be dotted);
    ``image_transform`` is an :class:`ImageTransform` dict (empty: its defaults); ``num_tokens``
    may pin the token count, otherwise one dummy forward at the transform's size measures it.
    """

    type: str = "module"
    target: str = ""
    kwargs: dict = field(default_factory=dict)
    feature_dim: int = 0
    layout: str = "grid"
    image_transform: dict = field(default_factory=dict)
    num_tokens: int | None = None


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """Flatten a feature grid ``[B, C, h, w]`` into row-major tokens ``[B, h*w, C]``."""
    return grid.flatten(2).transpose(1, 2)  # [B, C, h*w] -> [B, h*w, C]


class ModuleVisionEncoder(VisionEncoder):
    """Reads a wrapped module's output as vision features ``[B, N, D_v]`` (see the module docstring)."""

    def __init__(self, module: nn.Module, feature_dim: int, transform: ImageTransform, layout: str = "grid",
                 num_tokens: int | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"vision module layout must be one of {LAYOUTS}, got {layout!r}")
        if int(feature_dim) <= 0:
            raise ValueError(f"vision module feature_dim must be a positive channel count, got {feature_dim!r}")
        if num_tokens is not None and int(num_tokens) <= 0:
            raise ValueError(f"vision module num_tokens must be positive when given, got {num_tokens!r}")
        self.module = module
        self.feature_dim = int(feature_dim)
        self.transform = transform
        self.layout = layout
        self._num_tokens = None if num_tokens is None else int(num_tokens)
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}  # measured output grids per input size
        self.config: ModuleVisionConfig | None = None  # set when built from the registry

    def num_tokens(self) -> int:
        """Tokens per image; measured once with a dummy forward at the transform's size, then cached."""
        if self._num_tokens is None:
            output = self._probe(*self.transform.output_size)
            self._num_tokens = int(output.shape[2] * output.shape[3] if self.layout == "grid" else output.shape[1])
        return self._num_tokens

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the module's output map for a ``height × width`` input (``layout: grid``), measured once
        per size with a dummy forward; a ``tokens`` module has no grid."""
        if self.layout != "grid":
            raise ValueError(f"vision module {type(self.module).__name__} returns tokens (layout 'tokens'), not a grid")
        key = (int(height), int(width))
        if key not in self._grids:
            output = self._probe(*key)
            self._grids[key] = (int(output.shape[2]), int(output.shape[3]))
        return self._grids[key]

    def _probe(self, height: int, width: int) -> torch.Tensor:
        """The module's checked raw output for one zero image of ``height × width`` (in eval mode: BatchNorm
        statistics stay untouched)."""
        reference = next(self.module.parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dummy = torch.zeros(1, 3, height, width, device=device)  # [1, 3, H, W]
        with eval_mode(self), torch.no_grad():
            return self._raw_output(dummy)

    def _raw_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The module's output ``[B, C, h, w]`` (grid) or ``[B, N, C]`` (tokens), checked against the layout."""
        reference = next(self.module.parameters(), None)
        if reference is not None and reference.is_floating_point():
            pixel_values = pixel_values.to(reference.dtype)
        output = self.module(pixel_values)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"vision module {type(self.module).__name__} must return a tensor, "
                            f"got {type(output).__name__}")
        expected = 4 if self.layout == "grid" else 3
        channels = output.shape[1] if self.layout == "grid" else output.shape[-1]
        if output.dim() != expected or channels != self.feature_dim:
            axes = "[B, C, h, w]" if self.layout == "grid" else "[B, N, C]"
            raise ValueError(f"vision module layout '{self.layout}' expects {axes} with C={self.feature_dim}, "
                             f"got shape {tuple(output.shape)}")
        return output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D_v]
        output = self._raw_output(pixel_values)
        return grid_to_tokens(output) if self.layout == "grid" else output  # [B, N, D_v]

    def export_config(self) -> ModuleVisionConfig:
        """The registry config this encoder was built from (weights come from the checkpoint)."""
        if self.config is None:
            raise ValueError("this vision encoder wraps an in-memory module (wrap_module) and has no import path; "
                             "build it from a {'type': 'module', 'target': 'package.module:Factory', ...} spec "
                             "to save it as a config")
        return self.config


def wrap_module(module: nn.Module, feature_dim: int, transform: ImageTransform | dict,
                layout: str = "grid", num_tokens: int | None = None) -> ModuleVisionEncoder:
    """Wrap ``module`` as a vision encoder without the registry; it is put in eval mode like every encoder."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap_module needs an nn.Module, got {type(module).__name__}")
    if isinstance(transform, dict):
        transform = ImageTransform.from_dict(transform)
    encoder = ModuleVisionEncoder(module, feature_dim, transform, layout, num_tokens)
    encoder.eval()
    return encoder


def import_target(target: str) -> Callable[..., Any]:
    """Resolve ``"package.module:Name"`` (``Name`` may be dotted) to the object it names."""
    module_name, separator, attribute = target.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"vision module target must look like 'package.module:ClassOrFactory', got {target!r}")
    try:
        resolved: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"vision module target {target!r}: cannot import {module_name!r} "
                                  f"({error})") from error
    for name in attribute.split("."):
        if not hasattr(resolved, name):
            raise AttributeError(f"vision module target {target!r}: {module_name!r} has no attribute {attribute!r}")
        resolved = getattr(resolved, name)
    if not callable(resolved):
        raise TypeError(f"vision module target {target!r} is not a class or function")
    return resolved


@VISION_ENCODERS.register("module", ModuleVisionConfig)
def build_module_vision(cfg: ModuleVisionConfig) -> ModuleVisionEncoder:
    """Build ``cfg.target(**cfg.kwargs)`` and wrap it; parameters are random until weights are loaded."""
    module = import_target(cfg.target)(**cfg.kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"vision module target {cfg.target!r} returned {type(module).__name__}, not an nn.Module")
    encoder = wrap_module(module, cfg.feature_dim, ImageTransform.from_dict(dict(cfg.image_transform)),
                          cfg.layout, cfg.num_tokens)
    encoder.config = cfg
    return encoder
