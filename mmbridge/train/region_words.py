"""Region–word alignment: each visual token reads, through the frozen LLM's own output head, as the words of
what lies under it — a bridge-only stage that never runs the LLM's layers.

Why. Caption alignment (LLaVA's stage 1) teaches the bridge through every layer of a frozen LLM,
a few content words per caption; on a CPU it is most of a small run's time. When the data say
what lies where — boxes with words, as grounding sets (RefCOCO, Visual Genome, GRIT) and
MiniWorld's scene descriptions do — the bridge can be taught directly: the visual token of a
grid cell, passed through the LLM's final norm and the rows of its LM head that belong to the
candidate words, should pick the words of the region covering the cell's centre (one softmax
per attribute: colour among the colours, shape among the shapes…). With tied embeddings (SmolLM2,
Qwen2-0.5B…) those rows are the input embeddings, so the tokens move towards the embeddings the
LLM reads those words with. A second term keeps every token at the mean norm of the embedding
rows (the readout through the norm is scale-free). Cells under no region take only that term.

Cost: the encoder, the bridge and a ``[tokens × candidates]`` readout per image — about one
per cent of a caption step through a 135M LLM. The same idea is the "logit lens"
(nostalgebraist, 2020) used as a training signal; the targets are region phrases as in
grounded pretraining (Kosmos-2, arXiv 2306.14824; Shikra, arXiv 2306.15195).

Requirements: the bridge says its tokens lie on a grid over the whole image in row-major order
(``Bridge.token_grid``: token-wise projectors on a grid encoder, pooling, pixel shuffle), and the
image transform keeps the whole image (``resize: exact``, no crop, no padding), so a box in 0–999 of
the image is the same box on the token grid. Anything else is a clear ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mmbridge.data.formats.llava import Sample

IGNORE = -100


@dataclass
class WordGroups:
    """The attributes the regions name, each with its candidate words and their LM-head rows."""

    names: list[str]
    words: dict[str, list[str]]
    token_ids: dict[str, torch.Tensor]

    @classmethod
    def from_samples(cls, samples: list[Sample], tokenizer, where: str = "region_words") -> "WordGroups":
        """Every attribute and word in the samples' regions; a word is read at the first token of its spelling
        with a leading space (how the LLM meets it inside a sentence) that is not only whitespace. Two words
        read at the same token are an error."""
        seen: dict[str, set[str]] = {}
        for sample in samples:
            for region in sample.regions or []:
                for name, word in region["words"].items():
                    seen.setdefault(name, set()).add(word)
        if not seen:
            raise ValueError(f"{where}: no sample of the stage's data has regions (boxes with words) to align to")
        names = sorted(seen)
        words = {name: sorted(seen[name]) for name in names}
        token_ids = {}
        for name in names:
            ids = [_word_token(tokenizer, word) for word in words[name]]
            clashes = sorted({word for word, token in zip(words[name], ids) if ids.count(token) > 1})
            if clashes:
                raise ValueError(f"{where}: the {name} words {clashes} begin with the same token, so the LM head "
                                 f"cannot tell them apart")
            token_ids[name] = torch.tensor(ids)
        return cls(names, words, token_ids)

    def cell_labels(self, regions: list[dict] | None, grid: tuple[int, int]) -> torch.Tensor:
        """``[groups, rows * cols]`` word indices of the region covering each cell's centre (the smallest when
        several do), ``IGNORE`` where none does."""
        rows, cols = grid
        labels = torch.full((len(self.names), rows * cols), IGNORE, dtype=torch.long)
        for cell in range(rows * cols):
            row, column = divmod(cell, cols)
            x, y = (column + 0.5) * 1000 / cols, (row + 0.5) * 1000 / rows  # the cell centre in 0–999 units
            covering = [region for region in regions or []
                        if region["box"][0] <= x <= region["box"][2] and region["box"][1] <= y <= region["box"][3]]
            if not covering:
                continue
            region = min(covering, key=lambda item: (item["box"][2] - item["box"][0]) * (item["box"][3] - item["box"][1]))
            for group, name in enumerate(self.names):
                if name in region["words"]:
                    labels[group, cell] = self.words[name].index(region["words"][name])
        return labels


def _word_token(tokenizer, word: str) -> int:
    """The first token of ``" " + word`` that is more than whitespace (some tokenizers split the space off)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return next((token for token in ids if tokenizer.decode([token]).strip()), ids[0])


def check_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the bridge's token grid; a ``ValueError`` when its tokens do not lie on a grid over the whole
    image."""
    if model.highres is not None:
        raise ValueError(f"region_words reads one token grid over the whole image; a high-resolution strategy "
                         f"({model.config.highres.type}) gives each image crops and a layout of its own, which this "
                         f"objective does not read; train such a model's bridge with objective lm")
    grid = model.bridge.token_grid(model.vision.feature_layout())
    if grid is None:
        raise ValueError(f"region_words reads each visual token as the words of the region under it, but the "
                         f"{model.config.bridge.type} bridge's {model.tokens_per_image} tokens per image have no place "
                         f"in the image; use a bridge that keeps the grid (mlp, pool, pixel_shuffle)")
    transform = model.vision.transform
    if transform.resize != "exact" or transform.crop or transform.pad_to_square:
        raise ValueError("region_words needs an image transform that keeps the whole image (resize: exact, no crop, "
                         f"no pad_to_square); this encoder's is resize={transform.resize!r}, crop={transform.crop}, "
                         f"pad_to_square={transform.pad_to_square}")
    return grid


class RegionWordLoss(NamedTuple):
    """One batch's loss, its labelled cells, and per attribute ``(cells read right, cells labelled)``: the
    readout's accuracy, which says whether the visual tokens carry what the LLM will be asked about."""

    loss: torch.Tensor
    cells: int
    read: dict[str, tuple[int, int]]


def region_word_loss(model: nn.Module, batch: dict, groups: WordGroups) -> RegionWordLoss:
    """The stage loss for one batch (``pixel_values`` or cached ``image_features``, and ``regions``): mean
    cross-entropy over labelled cells and attributes, plus the norm term.

    Every sample holds one image; one without regions contributes the norm term only.
    """
    grid = check_grid(model)
    tokens = model.visual_tokens(batch.get("pixel_values"), batch.get("image_features"))  # [B, M, D]
    regions = batch.get("regions") or [None] * len(batch["ids"])
    if tokens.shape[0] != len(regions):
        raise ValueError(f"region_words takes one image per sample; this batch has {tokens.shape[0]} images for "
                         f"{len(regions)} samples ({batch['ids'][:3]}…)")
    labels = torch.stack([groups.cell_labels(sample_regions, grid) for sample_regions in regions])  # [B, G, M]
    hidden = model.llm.final_norm()(tokens.float() if tokens.dtype != torch.float32 else tokens)  # [n, M, D]
    head = model.llm.lm_head.weight  # [V, D]
    loss = tokens.new_zeros((), dtype=torch.float32)
    read = {}
    for group, name in enumerate(groups.names):
        logits = hidden @ head[groups.token_ids[name].to(head.device)].to(hidden.dtype).T  # [n, M, C]
        target = labels[:, group].to(logits.device)  # [n, M]
        labelled = target != IGNORE
        if labelled.any():
            loss = loss + nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                      ignore_index=IGNORE)
        read[name] = (int((logits.detach().argmax(-1) == target)[labelled].sum()), int(labelled.sum()))
    embedding_norm = model.llm.model.get_input_embeddings().weight.norm(dim=-1).mean()
    loss = loss + ((tokens.float().norm(dim=-1) / embedding_norm - 1) ** 2).mean()
    return RegionWordLoss(loss, int((labels != IGNORE).any(dim=1).sum()), read)
