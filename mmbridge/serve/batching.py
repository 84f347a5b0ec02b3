"""The scheduler: requests queued together are decoded together, in one left-padded batched ``generate``.

A request becomes a :class:`Job` and waits in the queue. The scheduler task takes the oldest waiting
job, waits ``batch_wait_ms`` for others to arrive, and takes up to ``max_batch`` queued jobs that may share
a decoding run with it (:attr:`Job.group_key`); the rest stay queued, in order. The group runs in the one
generation thread (so the event loop keeps serving), and a request that arrives meanwhile joins the *next*
batch, never the running one. Rows are grouped by identical sampling settings — ``generate`` takes one
setting per batch —: every greedy request shares one key, sampling requests share a key when their
temperature and top_p are equal, and a seeded sampling request always runs alone, so its seed gives the
same answer whatever else is queued. ``max_tokens`` and stop strings are per row.

A job's events (:class:`TextDelta`, :class:`Finished` with the row's answer images if any, :class:`Failed`) reach
its request through an ``asyncio.Queue`` fed from the generation thread. A job whose client went away is
``cancelled``: it is skipped while queued and its row is ignored while decoding.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from mmbridge.serve.errors import APIError, server_error
from mmbridge.serve.outputs import ImageOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy when ``temperature`` is 0, else sampling (seeded if ``seed`` is set)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_settings(self) -> dict[str, Any]:
        """The :class:`~mmbridge.generate.GenerationConfig` fields of these settings."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int
    images: list[dict[str, Any]] = field(default_factory=list)  # OpenAI image content parts, sent after the text


@dataclass
class Failed:
    error: APIError


Event = TextDelta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request's decoding: its processed ``example`` (``input_ids`` ``[L]``, ``pixel_values``, ``image_sizes``,
    ``bridge_inputs``), settings, what it asks of image answers and the queue its events go to."""

    example: dict[str, Any]
    sampling: Sampling
    max_tokens: int
    stop: list[str]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    image_options: ImageOptions = field(default_factory=ImageOptions)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set on the event loop when the client leaves; read by the generation thread

    @property
    def group_key(self) -> Hashable:
        """Jobs with equal keys may share a batch; a seeded sampling job's key is itself (it runs alone)."""
        if self.sampling.greedy:
            return "greedy"
        return self if self.sampling.seed is not None else (self.sampling.temperature, self.sampling.top_p)

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the request (callable from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    async def next_event(self) -> Event:
        return await self.events.get()


@dataclass
class BatchStats:
    """Counters shown by ``GET /health``."""

    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    dropped: int = 0  # requests whose client left while queued or decoding


class BatchScheduler:
    """Groups queued jobs and runs each group with ``run_group`` in one generation thread (it returns how many
    of the group's rows it dropped because their clients left)."""

    def __init__(self, run_group: Callable[[list[Job]], int], max_batch: int, wait_s: float,
                 max_queued: int) -> None:
        self.run_group = run_group
        self.max_batch, self.wait_s, self.max_queued = max_batch, wait_s, max_queued
        self.pending: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.stats = BatchStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmbridge-generate")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="mmbridge-scheduler")

    async def stop(self) -> None:
        """Stop scheduling; queued jobs fail with a 503 and the generation thread is released."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while self.pending:
            self.pending.popleft().emit(Failed(APIError(503, "the server is shutting down", code="shutting_down",
                                                        error_type="server_error")))
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next batch; a full queue is a 503."""
        if len(self.pending) >= self.max_queued:
            raise APIError(503, f"the server has {len(self.pending)} requests waiting (--max-queued); retry later",
                           code="server_busy", error_type="server_error")
        self.pending.append(job)
        self.arrived.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            if len(self.pending) < self.max_batch and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # let requests sent together arrive together
            group = self._take_group()
            if not self.pending:
                self.arrived.clear()
            if group:
                self._count(group)
                try:
                    self.stats.dropped += await loop.run_in_executor(self.executor, self.run_group, group)
                except Exception as error:  # run_group reports its own failures; this is the backstop
                    logger.exception("batch failed")
                    for job in group:  # a job that already ended has stopped reading its events
                        job.emit(Failed(server_error(f"the batch failed: {type(error).__name__}: {error}")))

    def _take_group(self) -> list[Job]:
        """Up to ``max_batch`` live jobs sharing the oldest live job's key; the others stay queued in order."""
        live = [job for job in self.pending if not job.cancelled]
        self.stats.dropped += len(self.pending) - len(live)
        if not live:
            self.pending.clear()
            return []
        key, group, kept = live[0].group_key, [], deque()
        for job in live:
            (group if len(group) < self.max_batch and job.group_key == key else kept).append(job)
        self.pending = kept
        return group

    def _count(self, group: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(group)
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
