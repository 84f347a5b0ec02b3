"""What a stage optimises: its objective's loss for one batch, and the model a run's objectives train.

A stage's ``objective`` (:class:`~mmbridge.train.recipe.StageConfig`):

* ``lm`` (the default) — next-token loss on the labels, through
  :meth:`~mmbridge.model.multimodal.MultimodalModel.forward`;
* ``region_words`` — each visual token reads as the words of its region through the frozen LLM's head
  (:mod:`~mmbridge.train.region_words`);
* ``itc_itm_itg`` — BLIP-2 stage 1 for a Q-Former, with no LLM (:mod:`~mmbridge.train.qformer_pretrain`): the
  run trains a :class:`~mmbridge.train.qformer_pretrain.QFormerPretrainModel` under the same keys
  (``vision``, ``bridge``, an empty ``llm``) and on image-caption examples, and its ``final/`` is the Q-Former
  directory a stage-2 bridge reads with ``init_from``. Such a run has no other objective (preflight);
* ``denoising`` — DDPM's noise-prediction loss for a text-to-image UNet under a frozen text encoder
  (:mod:`~mmbridge.train.denoising`): the run trains a :class:`~mmbridge.train.denoising.GeneratorModel` (``vision``
  the VAE, ``bridge`` the UNet, ``llm`` the text encoder, ``output`` empty) on image-caption examples, and its
  ``final/`` is a diffusers ``StableDiffusionPipeline`` directory. A run of its own, like stage 1.

:class:`StageObjective` holds the model and computes a stage's loss as one module, so that DDP (and FSDP)
wrap all of it, including objectives that call the model's parts past its ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, model_inputs
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.train.denoising import build_generator_model, generation_caption
from mmbridge.train.qformer_pretrain import build_pretrain_model, check_captions
from mmbridge.train.recipe import DENOISING_OBJECTIVE, STAGE1_OBJECTIVE, StageConfig
from mmbridge.train.region_words import WordGroups, check_grid, region_word_loss

StepLoss = tuple[torch.Tensor, int, dict[str, Any]]  # the loss, its labelled tokens (or cells), what a step logs


class StageObjective(nn.Module):
    """A stage's loss for one batch as a module: returns the loss, its labelled tokens (cells for
    ``region_words``) and what the step logs besides (``positions`` through the model, a fusion bridge's ``aux``
    losses and ``stats``, ``region_words``' ``read`` counts, stage 1's loss ``parts``)."""

    def __init__(self, model: nn.Module, objective: str = "lm", words: WordGroups | None = None) -> None:
        super().__init__()
        self.model, self.objective, self.words = model, objective, words

    def forward(self, batch: dict) -> StepLoss:
        if self.objective == "region_words":
            loss, cells, read = region_word_loss(self.model, batch, self.words)
            return loss, cells, {"read": read}
        if self.objective == STAGE1_OBJECTIVE:
            return _itc_itm_itg(self.model, batch)
        if self.objective == DENOISING_OBJECTIVE:
            output = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            return output.loss, output.images, {}  # "labelled" counts the images the loss averages over
        output = self.model(**model_inputs(batch), return_logits="none")
        positions = int(batch["attention_mask"].sum())  # through the LLM
        return output.loss, output.num_label_tokens, {"aux": output.aux_losses, "stats": output.stats,
                                                      "positions": positions}


def _itc_itm_itg(model: nn.Module, batch: dict) -> StepLoss:
    """BLIP-2 stage 1 on a batch of captions (``input_ids``/``attention_mask`` ``[B, T]``) and their images
    (pixels, or cached encoder outputs); the labelled tokens are those ITG predicts (every caption token after
    the first)."""
    mask = batch["attention_mask"]
    output = model(batch.get("pixel_values"), batch["input_ids"], mask, image_features=batch.get("image_features"))
    parts = {"itc": output.itc, "itm": output.itm, "itg": output.itg}
    return output.loss, int(mask[:, 1:].sum()), {"parts": parts, "positions": int(mask.sum())}


def stage_objective(stage: StageConfig, model: nn.Module, dataset: Any) -> StageObjective:
    """The objective of ``stage`` over ``model``, checked against the stage's data set before any step: the
    candidate words of a ``region_words`` stage (against the bridge's grid), and for stage 1 that every sample
    is an image-caption pair (unless ``skip_bad_samples``)."""
    words = None
    if stage.objective == "region_words":
        check_grid(model)
        words = WordGroups.from_samples(dataset.samples, model.tokenizer, where=f"stage '{stage.name}'")
    elif stage.objective == STAGE1_OBJECTIVE and not dataset.config.skip_bad_samples:
        check_captions(dataset.samples, f"stage '{stage.name}'", stage.objective)
    elif stage.objective == DENOISING_OBJECTIVE and not dataset.config.skip_bad_samples:
        check_captions(dataset.samples, f"stage '{stage.name}'", stage.objective, generation_caption)
    return StageObjective(model, stage.objective, words)


@dataclass(frozen=True)
class Batching:
    """How a stage's samples make micro-batches: grouped by length or not, and the fewest samples a micro-batch
    needs (one left with fewer is passed over, as one whose samples were all skipped)."""

    group_by_length: bool
    min_samples: int = 1


def stage_batching(stage: StageConfig, data: DataConfig) -> Batching:
    """The stage's batching: ``data.group_by_length``; for stage 1, whose ITC and ITM take their negatives from
    the batch, never by length (captions of one length would make them easier) and at least 2 samples (ITM mines
    each sample's negative among the others: an epoch's last batch of one sample is passed over); for ``denoising``
    uniform draws too (the caption's length says how many objects the image holds)."""
    if stage.objective == STAGE1_OBJECTIVE:
        return Batching(group_by_length=False, min_samples=2)
    if stage.objective == DENOISING_OBJECTIVE:
        return Batching(group_by_length=False)
    return Batching(data.group_by_length)


def build_model(run: RunConfig, stages: list[StageConfig]) -> nn.Module:
    """The model ``run`` trains: a :class:`~mmbridge.model.multimodal.MultimodalModel`, or for BLIP-2 stage 1
    (every stage ``itc_itm_itg``, preflight saw to it) the Q-Former with its stage-1 heads and no LLM, or for
    ``denoising`` (every stage) the image generator."""
    if stages and stages[0].objective == STAGE1_OBJECTIVE:
        return build_pretrain_model(run.model)
    if stages and stages[0].objective == DENOISING_OBJECTIVE:
        return build_generator_model(run.model)
    return MultimodalModel.from_config(run.model, processor_settings=run.processor)
