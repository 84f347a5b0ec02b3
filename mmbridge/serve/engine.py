"""Decoding one group of jobs: collate LEFT-padded, one batched ``generate``, each row's text to its own job.

Runs in the scheduler's generation thread. The streamer callback turns every step's ``[B]`` tokens into
per-row events: a row ends at EOS, at one of its stop strings or at its own ``max_tokens``, and a
cancelled row (its client left) is ignored from then on. When every row has ended the callback stops
``generate`` early, so a short answer never waits for the batch's longest budget.
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

logger = logging.getLogger(__name__)


class _AllRowsEnded(Exception):
    """Raised from the streamer to leave ``generate`` once no row needs another token."""


class Row:
    """One job's place in the batch: its tokens, text and whether it has ended."""

    def __init__(self, job: Job, tokenizer: Any, eos_ids: set[int], lock: threading.Lock) -> None:
        self.job, self.eos_ids, self.lock = job, eos_ids, lock
        self.text = AnswerText(tokenizer, job.stop)
        self.tokens = 0
        self.ended = False
        self.dropped = False  # its client left before the answer ended

    def step(self, token: int) -> None:
        """Take this row's next token."""
        if self.ended:
            return
        if self.job.cancelled:
            self.ended = self.dropped = True
            return
        self.tokens += 1
        if token in self.eos_ids:
            return self.finish("stop")
        with self.lock:
            delta, stopped = self.text.add(token)
        if delta:
            self.job.emit(TextDelta(delta))
        if stopped:
            self.finish("stop", flush=False)
        elif self.tokens >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        """Send the held-back text and the finish reason."""
        if self.ended:
            return
        self.ended = True
        if flush:
            with self.lock:
                rest = self.text.finish()
            if rest:
                self.job.emit(TextDelta(rest))
        self.job.emit(Finished(reason, self.tokens))

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.job.emit(Failed(server_error(message)))


class Engine:
    """Runs groups of jobs on ``model``; ``lock`` guards the tokenizer, shared with request preparation.

    ``pad_token_id`` pads prompts (masked out); ``eos_ids`` are the ids ``generate`` stops a row at by default.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, eos_ids: list[int], lock: threading.Lock) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_ids = set(eos_ids)
        self.lock = lock
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def run_group(self, jobs: list[Job]) -> int:
        """Decode ``jobs`` (equal sampling settings) in one batch; every job ends with Finished or Failed, except
        those whose client left: returns how many rows were dropped for that."""
        rows = [Row(job, self.model.tokenizer, self.eos_ids, self.lock) for job in jobs]

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
