"""Stage precision: bf16 autocast where the hardware runs it natively, frozen LLM weights cast once.

:func:`resolve_precision` keeps a stage's ``"bf16"`` (the default) on hardware with native
bf16 matmuls (CPUs with AVX512-BF16/AMX, CUDA GPUs that support it) and falls back to
``"fp32"`` with a warning elsewhere, where emulated bf16 is slower than fp32.

:class:`FrozenBf16Weights` serves bf16 stages. Under autocast every ``nn.Linear`` casts its
fp32 weight to bf16 on every call; for a frozen LLM that is a full read and half-size write
of the model per forward pass, and the cast copies are kept for the backward pass. The
class casts the frozen linear weights of the ``llm`` key once per stage and keeps the fp32
originals beside them: autocast would have produced exactly these bf16 tensors, so losses
and gradients are bit-identical (``tests/test_speed_equivalence.py``). Weights shared with
another module (tied embeddings) and parameters that trained in an earlier stage (they are
checkpointed) are left alone; :meth:`FrozenBf16Weights.fp32` swaps the originals back
(pointer swaps, no copy) around code that runs outside autocast.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger("mmbridge")
FROZEN_CAST_KEY = "llm"  # the module key whose frozen linear weights are cast once per bf16 stage


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision``, with ``"bf16"`` replaced by ``"fp32"`` (and a warning) where bf16 is not native."""
    if precision == "bf16" and not bf16_supported(device):
        logger.warning("bf16 is not native on %s: this stage trains in fp32", device)
        return "fp32"
    return precision


class FrozenBf16Weights:
    """bf16 copies of the frozen ``nn.Linear`` weights and biases under ``llm``, swapped in for a bf16 stage."""

    def __init__(self, model: nn.Module, exclude: set[str]) -> None:
        self.originals: dict[nn.Parameter, torch.Tensor] = {}
        self.casts: dict[nn.Parameter, torch.Tensor] = {}
        for parameter in _castable(model, exclude):
            self.originals[parameter] = parameter.data
            self.casts[parameter] = parameter.data.to(torch.bfloat16)

    def __len__(self) -> int:
        return len(self.casts)

    def cast(self) -> None:
        """Point every selected parameter at its bf16 copy."""
        for parameter, tensor in self.casts.items():
            parameter.data = tensor

    def restore(self) -> None:
        """Point every selected parameter back at its fp32 original."""
        for parameter, tensor in self.originals.items():
            parameter.data = tensor

    @contextlib.contextmanager
    def fp32(self) -> Iterator[None]:
        """The fp32 originals for the block (checkpoints, callbacks), bf16 again after."""
        self.restore()
        try:
            yield
        finally:
            self.cast()


@contextlib.contextmanager
def frozen_weights_in_bf16(model: nn.Module, precision: str, exclude: set[str]) -> Iterator[FrozenBf16Weights | None]:
    """For a ``"bf16"`` stage, cast the frozen LLM linear weights once for the block; fp32 stages get ``None``."""
    if precision != "bf16":
        yield None
        return
    weights = FrozenBf16Weights(model, exclude)
    weights.cast()
    try:
        yield weights
    finally:
        weights.restore()


def _castable(model: nn.Module, exclude: set[str]) -> list[nn.Parameter]:
    """Frozen fp32 weights/biases of ``nn.Linear`` modules under the cast key, owned by no other kind of module."""
    shared = {id(parameter) for module in model.modules() if not isinstance(module, nn.Linear)
              for parameter in module._parameters.values() if parameter is not None}
    chosen, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".", 1)[0] != FROZEN_CAST_KEY:
            continue
        for attribute, parameter in module.named_parameters(recurse=False):
            full_name = f"{name}.{attribute}"
            if (parameter.requires_grad or parameter.dtype != torch.float32 or full_name in exclude
                    or id(parameter) in shared or id(parameter) in seen):
                continue
            seen.add(id(parameter))
            chosen.append(parameter)
    return chosen
