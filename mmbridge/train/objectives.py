"""What a stage optimises: its objective's loss for one batch, and the model a run trains.

A stage's ``objective`` (:class:`~mmbridge.train.recipe.StageConfig`):

* ``lm`` (the default) — next-token loss on the labels, through
  :meth:`~mmbridge.model.multimodal.MultimodalModel.forward`;
* ``region_words`` — each visual token reads as the words of its region through the frozen LLM's head
  (:mod:`~mmbridge.train.region_words`).

:class:`StageObjective` holds the model and computes a stage's loss as one module, so that DDP (and FSDP)
wrap all of it, including objectives that call the model's parts past its ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, model_inputs
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.train.recipe import StageConfig
from mmbridge.train.region_words import WordGroups, check_grid, region_word_loss

StepLoss = tuple[torch.Tensor, int, dict[str, Any]]  # the loss, its labelled tokens (or cells), what a step logs


class StageObjective(nn.Module):
    """A stage's loss for one batch as a module: returns the loss, its labelled tokens (cells for
    ``region_words``) and what the step logs besides (``positions`` through the model, a fusion bridge's ``aux``
    losses and ``stats``, ``region_words``' ``read`` counts)."""

    def __init__(self, model: nn.Module, objective: str = "lm", words: WordGroups | None = None) -> None:
        super().__init__()
        self.model, self.objective, self.words = model, objective, words

    def forward(self, batch: dict) -> StepLoss:
        if self.objective == "region_words":
            loss, cells, read = region_word_loss(self.model, batch, self.words)
            return loss, cells, {"read": read}
        output = self.model(**model_inputs(batch), return_logits="none")
        positions = int(batch["attention_mask"].sum())  # through the LLM
        return output.loss, output.num_label_tokens, {"aux": output.aux_losses, "stats": output.stats,
                                                      "positions": positions}


def stage_objective(stage: StageConfig, model: nn.Module, dataset: Any) -> StageObjective:
    """The objective of ``stage`` over ``model``, checked against the stage's data set before any step: the
    candidate words of a ``region_words`` stage (against the bridge's grid)."""
    words = None
    if stage.objective == "region_words":
        check_grid(model)
        words = WordGroups.from_samples(dataset.samples, model.tokenizer, where=f"stage '{stage.name}'")
    return StageObjective(model, stage.objective, words)


def groups_by_length(stage: StageConfig, data: DataConfig) -> bool:
    """Whether the stage's batches are grouped by length (``data.group_by_length``)."""
    return data.group_by_length


def build_model(run: RunConfig, stages: list[StageConfig]) -> nn.Module:
    """The model ``run`` trains: a :class:`~mmbridge.model.multimodal.MultimodalModel`."""
    return MultimodalModel.from_config(run.model, processor_settings=run.processor)
