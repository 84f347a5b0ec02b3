"""Decoding one group of jobs: collate LEFT-padded, one batched ``generate``, each row's text to its own job.

Runs in the scheduler's generation thread. The streamer callback turns every step's ``[B]`` tokens into
per-row events: a row ends at EOS, at one of its stop strings or at its own ``max_tokens``, and a
cancelled row (its client left) is ignored from then on. When every row has ended the callback stops
``generate`` early, so a short answer never waits for the batch's longest budget.

A row that ends hands itself to the engine's ``answer_images`` hook, where one is set (a model that answers with
images, :mod:`~mmbridge.serve.outputs`); the images it returns travel in the row's :class:`Finished` event as
OpenAI image content parts. A hook that fails fails its row (a 500), not the batch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import nn

from mmbridge.data.collate import collate, image_inputs
from mmbridge.generate import generate
from mmbridge.serve.batching import Failed, Finished, Job, TextDelta
from mmbridge.serve.detokenize import AnswerText
from mmbridge.serve.errors import server_error
from mmbridge.serve.outputs import AnswerImages, FinishedRow, image_content_parts

logger = logging.getLogger(__name__)


class _AllRowsEnded(Exception):
    """Raised from the streamer to leave ``generate`` once no row needs another token."""


class Row:
    """One job's place in the batch: its tokens, text and whether it has ended."""

    def __init__(self, job: Job, tokenizer: Any, eos_ids: set[int], lock: threading.Lock,
                 answer_images: AnswerImages | None = None) -> None:
        self.job, self.eos_ids, self.lock = job, eos_ids, lock
        self.answer_images = answer_images
        self.text = AnswerText(tokenizer, job.stop)
        self.token_ids: list[int] = []  # every token this row took, its EOS included
        self.ended = False
        self.dropped = False  # its client left before the answer ended

    def step(self, token: int) -> None:
        """Take this row's next token."""
        if self.ended:
            return
        if self.job.cancelled:
            self.ended = self.dropped = True
            return
        self.token_ids.append(token)
        if token in self.eos_ids:
            return self.finish("stop")
        with self.lock:
            delta, stopped = self.text.add(token)
        if delta:
            self.job.emit(TextDelta(delta))
        if stopped:
            self.finish("stop", flush=False)
        elif len(self.token_ids) >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        """Send the held-back text, then the finish reason with the row's answer images."""
        if self.ended:
            return
        self.ended = True
        if flush:
            with self.lock:
                rest = self.text.finish()
            if rest:
                self.job.emit(TextDelta(rest))
        try:
            images = self.images(reason)
        except Exception as error:  # the model's hook failed: this row's request gets a 500, the batch goes on
            logger.exception("the answer_images hook failed")
            self.job.emit(Failed(server_error(f"drawing the answer's images failed: {type(error).__name__}: "
                                              f"{error}")))
            return
        self.job.emit(Finished(reason, len(self.token_ids), images))

    def images(self, reason: str) -> list[dict[str, Any]]:
        """The ``answer_images`` hook's images for this ended row, as OpenAI image content parts (none without
        a hook)."""
        if self.answer_images is None:
            return []
        options = self.job.image_options
        row = FinishedRow(example=self.job.example, token_ids=list(self.token_ids), text=self.text.sent,
                          finish_reason=reason, options=options)
        return image_content_parts(self.answer_images(row), options.largest_side)

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.job.emit(Failed(server_error(message)))


class Engine:
    """Runs groups of jobs on ``model``; ``lock`` guards the tokenizer, shared with request preparation.

    ``pad_token_id`` pads prompts (masked out); ``eos_ids`` are the ids ``generate`` stops a row at by default.
    ``answer_images`` is the hook for models that answer with images (:data:`~mmbridge.serve.outputs.AnswerImages`):
    called once per finished row with a :class:`~mmbridge.serve.outputs.FinishedRow`, it returns the row's PIL
    images; ``None`` (every text-only model) gives text answers only.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, eos_ids: list[int], lock: threading.Lock,
                 answer_images: AnswerImages | None = None) -> None:
        self.model = model
        self.answer_images = answer_images
        self.pad_token_id = pad_token_id
        self.eos_ids = set(eos_ids)
        self.lock = lock
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def run_group(self, jobs: list[Job]) -> int:
        """Decode ``jobs`` (equal sampling settings) in one batch; every job ends with Finished or Failed, except
        those whose client left: returns how many rows were dropped for that."""
        rows = [Row(job, self.model.tokenizer, self.eos_ids, self.lock, self.answer_images) for job in jobs]

        def streamer(tokens: torch.Tensor) -> None:  # [B]
            for row, token in zip(rows, tokens.tolist()):
                row.step(token)
            if all(row.ended for row in rows):
                raise _AllRowsEnded

        try:
            self._generate(jobs, streamer)
        except _AllRowsEnded:
            pass
        except Exception as error:  # the request was valid: a 500 for its rows, the server keeps serving
            logger.exception("generation failed for a batch of %d", len(jobs))
            for row in rows:
                row.fail(f"generation failed: {type(error).__name__}: {error}")
        for row in rows:  # generate reached the longest budget: the rows still open end by length
            row.finish("length")
        return sum(row.dropped for row in rows)

    def _generate(self, jobs: list[Job], streamer: Any) -> None:
        batch = collate([{"id": str(index), **job.example} for index, job in enumerate(jobs)], self.pad_token_id,
                        padding_side="left")
        generate(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                 streamer=streamer, max_new_tokens=max(job.max_tokens for job in jobs),
                 **jobs[0].sampling.generate_settings(), **image_inputs(batch, self.device))
