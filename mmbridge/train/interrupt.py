"""Ctrl-C during training: finish the step, save a checkpoint, stop with a message that says how to resume.

:class:`StopOnInterrupt` replaces the SIGINT handler for the duration of a training loop (in
the main thread only). The first Ctrl-C only sets :attr:`StopOnInterrupt.requested`; the loop
checks it after each optimizer step, writes a checkpoint and raises :class:`TrainingInterrupted`.
A second Ctrl-C raises ``KeyboardInterrupt`` at once (nothing since the last checkpoint is kept).

Under ``torchrun``/``accelerate launch`` a Ctrl-C reaches each process twice: from the terminal,
and again from the launcher, which forwards it. With ``grace`` seconds, a second SIGINT that soon
after the first counts as the same Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

from tqdm.auto import tqdm


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after a checkpoint was written; the message says where and how to resume."""

    def __init__(self, message: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class StopOnInterrupt:
    """A context in which the first SIGINT asks the loop to stop after its step, and a second one aborts."""

    def __init__(self, grace: float = 0.0) -> None:
        self.requested = False
        self.grace = grace
        self._first = 0.0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if time.monotonic() - self._first < self.grace:
                return  # the launcher forwarding the Ctrl-C this process already received
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        # one write, the newline with the text: under a launcher several processes share the pipe, and a record
        # another process prints between the text and its newline would land on this line
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)\n",
                   end="")
