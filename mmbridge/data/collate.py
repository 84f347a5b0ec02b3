"""Batching processed examples: padding on either side, labels padded with IGNORE_INDEX, images concatenated."""

from __future__ import annotations

from typing import Any

import torch

from mmbridge.data.bridge_inputs import BridgeInputs

IGNORE_INDEX = -100  # the label of a position that is not a target (prompt, image, padding), as in transformers

BATCH_ONLY_KEYS = ("ids", "regions")  # batch entries that are not model inputs
IMAGE_KEYS = ("pixel_values", "image_sizes", "bridge_inputs")  # how a batch's images reach the model


def model_inputs(batch: dict) -> dict:
    """The batch without what only the data pipeline and losses read (sample ids, regions)."""
    return {key: value for key, value in batch.items() if key not in BATCH_ONLY_KEYS}


def image_inputs(batch: dict, device: Any = None) -> dict[str, Any]:
    """``pixel_values``, ``image_sizes`` and ``bridge_inputs`` of a batch or processed example (None where absent),
    on ``device``: the keyword arguments ``generate`` and ``encode_images`` take."""
    inputs = {key: batch.get(key) for key in IMAGE_KEYS}
    if device is None:
        return inputs
    return {key: value.to(device) if value is not None else None for key, value in inputs.items()}


def collate(examples: list[dict | None], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of processed examples into one batch; ``None`` examples (skipped samples) are dropped.

    Returns ``input_ids``, ``attention_mask`` and (when the examples carry them) ``labels``,
    all ``[B, L]`` (labels ``[B, T]`` when they are an encoder–decoder LLM's decoder targets);
    ``pixel_values`` ``[n_total_images, 3, H, W]`` in batch order, or ``None`` when no example
    has an image; ``image_sizes`` ``[n_total_images, 2]``, ``bridge_inputs`` and ``output_captions`` (per output
    modality, joined in batch order) when the examples carry them; and ``ids``. Examples that carry precomputed encoder
    outputs (a feature cache) give ``image_features`` ``[n_total_images, N, D_v]`` instead of
    ``pixel_values``. ``regions`` (a list per example, ``None`` where an example has none) come along
    when any example has them. Use ``padding_side="left"`` for generation.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    examples = [example for example in examples if example is not None]
    with_labels = sum("labels" in example for example in examples)
    if with_labels not in (0, len(examples)):
        raise ValueError(f"{with_labels} of {len(examples)} examples have labels; a batch needs all or none")
    length = max((len(example["input_ids"]) for example in examples), default=0)
    batch = {
        "input_ids": _pad([example["input_ids"] for example in examples], length, pad_token_id, padding_side),
        "attention_mask": _pad([torch.ones(len(example["input_ids"]), dtype=torch.long) for example in examples],
                               length, 0, padding_side),
    }
    if examples and with_labels:  # as long as input_ids, or (an encoder-decoder LLM's targets) their own length
        label_length = max(len(example["labels"]) for example in examples)
        batch["labels"] = _pad([example["labels"] for example in examples], label_length, IGNORE_INDEX,
                               padding_side)
    if any("image_features" in example for example in examples):
        batch["image_features"] = _concat_images(examples, "image_features")
    else:
        batch["pixel_values"] = _concat_images(examples)
    sizes = [example["image_sizes"] for example in examples if example.get("image_sizes") is not None]
    if sizes:
        batch["image_sizes"] = torch.cat(sizes)  # [n_total_images, 2]
    extras = BridgeInputs.concat([example.get("bridge_inputs") for example in examples])
    if extras is not None:
        batch["bridge_inputs"] = extras
    captions = _joined_captions(examples)
    if captions:
        batch["output_captions"] = captions
    batch["ids"] = [example["id"] for example in examples]
    if any("regions" in example for example in examples):  # region–word alignment targets, per sample
        batch["regions"] = [example.get("regions") for example in examples]
    return batch


def _joined_captions(examples: list[dict]) -> dict[str, list[str]]:
    """Per output modality, every example's output captions in batch order (a model that answers with images)."""
    joined: dict[str, list[str]] = {}
    for example in examples:
        for modality, captions in example.get("output_captions", {}).items():
            joined.setdefault(modality, []).extend(captions)
    return joined


def _pad(rows: list[torch.Tensor], length: int, value: int, padding_side: str) -> torch.Tensor:
    """Stack 1-D long tensors into ``[B, length]``, filling with ``value`` on ``padding_side``."""
    padded = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if padding_side == "right":
            padded[index, :len(row)] = row
        elif len(row):
            padded[index, -len(row):] = row
    return padded


def _concat_images(examples: list[dict], key: str = "pixel_values") -> torch.Tensor | None:
    """All examples' per-image rows under ``key`` in batch order (``[n, 3, H, W]`` pixels); ``None`` when none.
    Rows that differ in their trailing sizes (a high-resolution strategy's crops, or their cached features) are
    zero-padded at the end of each axis to the largest; the model knows each crop's true size from its layout."""
    images = [example[key] for example in examples if example.get(key) is not None and len(example[key])]
    return concat_padded(images) if images else None


def pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Tensors that differ in their sizes, zero-padded at the end of each axis and stacked."""
    return concat_padded([row.unsqueeze(0) for row in rows])


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors ``[n_i, ...]`` concatenated on the first axis, zero-padded at the end of every other axis to the
    largest when they differ (crops of different sizes, or their features)."""
    if len({tuple(tensor.shape[1:]) for tensor in tensors}) == 1:
        return torch.cat(tensors)
    shape = [max(tensor.shape[axis] for tensor in tensors) for axis in range(1, tensors[0].dim())]
    padded = tensors[0].new_zeros(sum(len(tensor) for tensor in tensors), *shape)
    start = 0
    for tensor in tensors:
        padded[(slice(start, start + len(tensor)), *[slice(0, extent) for extent in tensor.shape[1:]])] = tensor
        start += len(tensor)
    return padded
