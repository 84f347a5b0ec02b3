"""Micro-batches built ahead in worker processes (``data.num_workers``), in exactly the stage's order.

A stage's micro-batch ``m`` is a pure function of (seed, stage, epoch, ``m``): its sample indices, the
loaded and processed samples, the collated tensors. So ``N`` worker processes can each build whole
micro-batches (read images, transform, tokenize, collate) ahead of the training loop without changing
what the loop sees. :class:`MicroBatches` hands the loop micro-batches ``start, start + stride, …`` (the
positions one training process reads); with workers it runs a torch ``DataLoader`` (``batch_size=None``,
in order, ``prefetch_factor`` micro-batches per worker in flight) over those positions. The loop gets the
same tensors as in-process, so training with 0 and ``N`` workers gives the same losses and weights, and
an exact resume needs no loader state: the stream restarts at the checkpoint's position.

Skipped bad samples: a worker counts them in its own copy of the data set, so every micro-batch comes
back with the ``(sample id, reason)`` records of the samples it skipped, and the main process adds them to
its data set's :attr:`skipped` / :attr:`skipped_samples` when the loop takes that micro-batch. Counts
therefore equal the in-process ones (micro-batches prefetched past the end of a stage count nothing).

Errors: a :class:`~mmbridge.data.processor.SampleError` in a worker (a bad sample without
``skip_bad_samples``) is sent back and raised again in the main process with its type, message (naming
the sample and the file), sample id and reason; any other exception surfaces through the DataLoader with
the worker's traceback.

Workers are forked where the platform has ``fork`` (nothing is pickled; a data set that reads files must
open its handles lazily in the process that reads, never use one inherited from the parent), run one torch
thread each, ignore SIGINT (the training loop decides what Ctrl-C does, then shuts them down), and live for
one stage: :meth:`MicroBatches.close` (or leaving its ``with`` block, on error too) stops them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mmbridge.data.processor import SampleError

PREFETCH_FACTOR = 2  # micro-batches in flight per worker: enough to hide one slow micro-batch, little memory


class StageMicroBatches(Protocol):
    """What :class:`MicroBatches` reads: a stage's deterministic micro-batches and the data set they come from."""

    dataset: Any  # has ``skipped`` (Counter by reason) and ``skipped_samples`` (list of (id, reason))
    seed: int
    batches_per_epoch: int

    def micro_batch(self, index: int) -> dict | None:
        ...


@dataclass
class _Made:
    """One micro-batch as a worker returns it: the collated batch (``None``: every sample skipped), the skips
    it caused, or the sample error it raised (type, args, attributes)."""

    position: int
    batch: dict | None = None
    skips: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[type, tuple, dict] | None = None
    worker: int = 0  # the worker's process id


class _InWorker(torch.utils.data.Dataset):
    """The DataLoader's data set: position → :class:`_Made`, run inside a worker process."""

    def __init__(self, data: StageMicroBatches) -> None:
        self.data = data

    def __getitem__(self, position: int) -> _Made:
        records = self.data.dataset.skipped_samples
        before = len(records)
        try:
            batch = self.data.micro_batch(position)
        except SampleError as error:
            made = _Made(position, error=(type(error), error.args, dict(vars(error))))
        else:
            made = _Made(position, batch)
        made.skips, made.worker = list(records[before:]), os.getpid()
        return made


class _Positions:
    """The positions ``start, start + stride, …`` without end (the loop stops asking when the stage is done)."""

    def __init__(self, start: int, stride: int) -> None:
        self.start, self.stride = start, stride

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.stride)


def _unchanged(made: _Made) -> _Made:
    """The DataLoader's ``collate_fn``: the worker's micro-batch is already collated."""
    return made


def _worker_init(worker_id: int) -> None:
    """Each worker: Ctrl-C is the main process's to handle; one torch thread (the workers are the parallelism)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _rebuilt(error: tuple[type, tuple, dict], position: int, pid: int) -> SampleError:
    """The worker's sample error as an exception of the same type, message and attributes."""
    kind, args, attributes = error
    rebuilt = kind.__new__(kind, *args)
    rebuilt.args = args
    vars(rebuilt).update(attributes)
    rebuilt.add_note(f"(raised in a data loader worker, process {pid}, building micro-batch {position})")
    return rebuilt


def record_skips(dataset: Any, skips: list[tuple[str, str]]) -> None:
    """Add a worker's skipped-sample records to ``dataset``'s counts (by reason) and list."""
    for sample_id, reason in skips:
        dataset.skipped[reason] += 1
        dataset.skipped_samples.append((sample_id, reason))


class MicroBatches:
    """A stage's micro-batches for one training process, built in ``num_workers`` worker processes (0: in this
    process, on demand, exactly as :meth:`StageMicroBatches.micro_batch` does).

    Ask for them in stream order: the first :meth:`micro_batch` call fixes the start, each later one must ask
    for the previous position + ``stride`` (the number of training processes).
    """

    def __init__(self, data: StageMicroBatches, stride: int = 1, num_workers: int = 0,
                 prefetch_factor: int = PREFETCH_FACTOR) -> None:
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.data, self.stride, self.num_workers, self.prefetch_factor = data, stride, num_workers, prefetch_factor
        self._iterator: Any = None
        self._next: int | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.data.batches_per_epoch

    def micro_batch(self, index: int) -> dict | None:
        """Micro-batch ``index`` of the stage, collated, or ``None`` when every sample of it was skipped."""
        if self.num_workers == 0:
            return self.data.micro_batch(index)
        if self._iterator is None:
            self._iterator = iter(self._loader(index))
        elif index != self._next:
            raise RuntimeError(f"micro-batch {index} asked for, but the loader's workers make {self._next} next "
                               f"(positions must advance by {self.stride})")
        made = next(self._iterator)
        if made.position != index:  # the DataLoader keeps sampler order (in_order); this guards the promise
            raise RuntimeError(f"the data loader returned micro-batch {made.position} where {index} was due")
        self._next = index + self.stride
        record_skips(self.data.dataset, made.skips)
        if made.error is not None:
            raise _rebuilt(made.error, index, made.worker)
        return made.batch

    def _loader(self, start: int) -> torch.utils.data.DataLoader:
        methods = multiprocessing.get_all_start_methods()
        return torch.utils.data.DataLoader(
            _InWorker(self.data), batch_size=None, sampler=_Positions(start, self.stride),
            num_workers=self.num_workers, collate_fn=_unchanged, worker_init_fn=_worker_init,
            prefetch_factor=self.prefetch_factor, in_order=True,
            multiprocessing_context="fork" if "fork" in methods else None,
            generator=torch.Generator().manual_seed(self.data.seed))  # not the global RNG: training draws from it

    def close(self) -> None:
        """Stop the workers (if any are running); a later :meth:`micro_batch` call starts new ones."""
        iterator, self._iterator, self._next = self._iterator, None, None
        if iterator is not None:
            iterator._shutdown_workers()  # joins the workers now rather than when the iterator is collected

    def __enter__(self) -> "MicroBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
