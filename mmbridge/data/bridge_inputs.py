"""Per-image inputs a bridge reads besides the features: one typed structure, made by the processor, joined by
``collate``, passed to the model as ``bridge_inputs=``.

* ``text_ids`` / ``text_mask`` ``[n_images, T]`` — the instruction of the turn holding each image, tokenized by the
  bridge's own tokenizer (InstructBLIP's instruction-aware Q-Former, LLaMA-VID's context token);
* ``media_frames`` ``[n_media, 1]`` — how many consecutive frames of ``pixel_values`` form each media (a video read
  as one media by a bridge that takes video, e.g. the Perceiver Resampler with temporal embeddings).

Image sizes are not here: they are transformers' ``image_sizes``, a named argument of the model's ``forward``,
``generate``, ``chat`` and ``encode_images``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class BridgeInputs:
    """Rows in image order (``media_frames``: in media order); a field a model's bridge does not read is None."""

    text_ids: torch.Tensor | None = None  # [n_images, T]
    text_mask: torch.Tensor | None = None  # [n_images, T]
    media_frames: torch.Tensor | None = None  # [n_media, 1]

    def __post_init__(self) -> None:
        if (self.text_ids is None) != (self.text_mask is None):
            raise ValueError("BridgeInputs needs text_ids and text_mask together")
        if self.text_ids is not None and self.text_ids.shape != self.text_mask.shape:
            raise ValueError(f"BridgeInputs text_ids {tuple(self.text_ids.shape)} and text_mask "
                             f"{tuple(self.text_mask.shape)} differ in shape")

    def to(self, device: torch.device | str) -> "BridgeInputs":
        """The same inputs on ``device``."""
        return replace(self, **{name: value.to(device) for name, value in self._tensors().items()})

    def rows(self, images: torch.Tensor) -> "BridgeInputs":
        """The per-image rows of ``images`` (indices ``[k]``, repeats allowed: one row per crop of an image); a media
        of several frames (a video) has no per-image row."""
        if self.media_frames is not None and bool((self.media_frames != 1).any()):
            raise ValueError("a video read as one media cannot be cut into crops (media_frames with a "
                             "high-resolution strategy)")
        return replace(self, **{name: value[images.to(value.device)] for name, value in self._tensors().items()})

    def repeat(self, times: int) -> "BridgeInputs":
        """Every row ``times`` over, in blocks (one copy of a prompt's images per scored continuation)."""
        return replace(self, **{name: value.repeat(times, *[1] * (value.dim() - 1))
                                for name, value in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}

    @staticmethod
    def concat(parts: list["BridgeInputs | None"]) -> "BridgeInputs | None":
        """The examples' inputs in batch order (texts right-padded with 0 to the longest); None when none has any."""
        present = [part for part in parts if part is not None]
        if not present:
            return None
        joined = {}
        for item in fields(BridgeInputs):  # an example without images carries none of them
            rows = [getattr(part, item.name) for part in present if getattr(part, item.name) is not None]
            joined[item.name] = _concat_right_padded(rows) if rows else None
        return BridgeInputs(**joined)


def _concat_right_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[n_i, T_i]`` → ``[sum n_i, max T]``, right-padded with 0."""
    width = max(row.shape[1] for row in rows)
    return torch.cat([torch.nn.functional.pad(row, (0, width - row.shape[1])) for row in rows])
