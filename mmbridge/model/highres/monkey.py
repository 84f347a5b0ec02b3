"""Monkey (Li et al. 2023, arXiv 2311.06607, "Monkey: Image resolution and text label are important things for
large multi-modal models").

Every image, whatever its size, is resized to one fixed large input of ``windows = [rows, cols]`` encoder-size
tiles (896×896 = 2×2 tiles of a 448 encoder in the released model; the paper goes up to 896×1344, 2×3). A
sliding window with stride = window = the encoder's size cuts it into ``rows × cols`` non-overlapping tiles,
and the large input resized down to the encoder's size is the global view. Each tile *position* has its own
LoRA on the shared, frozen encoder; the global view goes through the plain encoder (Monkey's ``visual.py``
calls the encoder with ``idx=None`` for it). A shared resampler — here the model's bridge — compresses each
crop's features, and the crops' tokens reach the LLM together: the tiles in reading order, then the global view
(``torch.cat([local_feat, global_feat])`` in the reference ``modeling_monkey.py``).

The adapters are peft LoRA layers injected in place into the vision encoder, one named adapter per position
(``tile1`` … ``tileK``), on the attention projections and the MLP by default (the reference adds LoRA to the
attention's input/output projections and to the MLP). Crops are encoded one pass per position
(:func:`~mmbridge.model.highres.base.encode_crops` groups them by :meth:`Monkey.adapter_key`), and
:meth:`Monkey.encoder_context` activates exactly that position's adapter — none for the global view. Outside
those contexts every adapter is disabled, so the encoder is the plain one. peft's ``set_adapter`` and
``enable_adapters`` also set ``requires_grad``; the switch puts every flag back as it found it, so
:func:`~mmbridge.train.recipe.apply_stage` stays the only code that decides what trains (a stage trains the
tiles' LoRA with ``vision: lora``: the adapters already exist, so only they train and none is added).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image
from torch import nn

from mmbridge.model.highres.base import HIGHRES, VISUAL, Crop, HighResStrategy, ImageLayout, split_grid
from mmbridge.model.lora import LoraSpec, inject_lora
from mmbridge.model.vision.transform import resample_filter

MONKEY_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # CLIP/SigLIP attention and MLP


@dataclass
class MonkeyConfig:
    """``windows``: the fixed input as ``[rows, cols]`` encoder-size tiles, one LoRA per tile position; ``r``,
    ``alpha``, ``dropout``, ``target_modules``: each tile's LoRA (the reference: rank 16, scale 1, dropout 0.05)."""

    type: str = "monkey"
    windows: list[int] = field(default_factory=lambda: [2, 2])
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(MONKEY_TARGETS))

    def __post_init__(self) -> None:
        if len(self.windows) != 2 or min(self.windows) < 1:
            raise ValueError(f"monkey windows is [rows, cols] of encoder-size tiles, both >= 1; got {self.windows}")
        if self.r < 1:
            raise ValueError(f"monkey LoRA rank r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("monkey target_modules must name at least one linear layer of the vision encoder")

    @property
    def tiles(self) -> int:
        return self.windows[0] * self.windows[1]


class Monkey(HighResStrategy):
    """Monkey's fixed sliding window with a LoRA per tile position; see the module docstring."""

    cfg: MonkeyConfig

    def attach(self, vision: nn.Module, bridge: nn.Module, tokenizer: Any, hidden_size: int) -> None:
        """Inject one LoRA adapter per tile position into ``vision`` (kept on a reload: the config rebuilds them)."""
        super().attach(vision, bridge, tokenizer, hidden_size)
        spec = LoraSpec(r=self.cfg.r, alpha=self.cfg.alpha, dropout=self.cfg.dropout,
                        target_modules=list(self.cfg.target_modules))
        base_flags = {name: parameter.requires_grad for name, parameter in vision.named_parameters()}
        if any("lora_" in name for name in base_flags):
            raise ValueError("monkey adds its per-tile LoRA to the vision encoder, which already holds LoRA layers; "
                             "give vision no other adapter")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")  # peft warns from the second adapter on
            for position in range(1, self.cfg.tiles + 1):
                inject_lora(vision, spec, adapter_name=self.adapter_name(position))
        self._activate(None)
        for name, parameter in vision.named_parameters():  # injection froze the base: leave that to apply_stage
            parameter.requires_grad_(base_flags.get(name.replace(".base_layer.", "."), True))

    @staticmethod
    def adapter_name(position: int) -> str:
        """The peft adapter of tile ``position`` (1-based, reading order)."""
        return f"tile{position}"

    # -- layout ---------------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) every image is resized to: ``windows`` encoder-size tiles."""
        height, width = self.encoder_size
        return self.cfg.windows[0] * height, self.cfg.windows[1] * width

    def plan(self, image_size: tuple[int, int]) -> ImageLayout:
        tile = self.encoder_size
        crops = [Crop(tile, position) for position in range(1, self.cfg.tiles + 1)] + [Crop(tile, 0, overview=True)]
        count = sum(self.crop_tokens(crop) for crop in crops)
        return ImageLayout(image_size, crops, [VISUAL] * count, grid=(self.cfg.windows[0], self.cfg.windows[1]),
                           extra={"input_size": self.input_size})

    def crop(self, image: Image.Image) -> list[Image.Image]:
        """The tiles of the resized image in reading order, then the global view (the resized image shrunk to the
        encoder's size, as the reference interpolates its 896×896 input down to 448×448)."""
        height, width = self.input_size
        tile_height, tile_width = self.encoder_size
        resample = resample_filter(self.vision.transform.resample)  # type: ignore[union-attr]
        resized = image.convert("RGB").resize((width, height), resample)  # aspect ratio not kept, as Monkey
        return split_grid(resized, *self.cfg.windows) + [resized.resize((tile_width, tile_height), resample)]

    # -- per-position adapters ------------------------------------------------------------------
    def adapter_key(self, crop: Crop) -> int:
        """The tile position (0: the global view, which uses the plain encoder)."""
        return 0 if crop.overview else crop.position

    @contextlib.contextmanager
    def encoder_context(self, key: int) -> Iterator[None]:
        """Exactly tile ``key``'s LoRA active while its crops are encoded (none for key 0); all off afterwards."""
        if not 0 <= key <= self.cfg.tiles:
            raise ValueError(f"monkey has {self.cfg.tiles} tile positions (1..{self.cfg.tiles}, 0: global view), "
                             f"got {key}")
        self._activate(self.adapter_name(key) if key else None)
        try:
            yield
        finally:
            self._activate(None)

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [module for module in self.vision.modules() if isinstance(module, LoraLayer)]  # type: ignore[union-attr]

    def _activate(self, adapter: str | None) -> None:
        """Make ``adapter`` the only active LoRA of the encoder (None: all disabled), leaving every parameter's
        ``requires_grad`` as it was (peft's switches set it; :func:`apply_stage` alone decides it)."""
        vision: nn.Module = self.vision  # type: ignore[assignment]
        flags = [(parameter, parameter.requires_grad) for parameter in vision.parameters()]
        for layer in self._lora_layers():
            if adapter is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(adapter)
                layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@HIGHRES.register("monkey", MonkeyConfig)
def build_monkey(cfg: MonkeyConfig) -> Monkey:
    return Monkey(cfg)
