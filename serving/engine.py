"""The scheduler: one thread runs every request on the one elastic model, a decoding step at a time.

Requests at the same architecture decode together as one batch (`batching`: left-padded rows, one KV cache);
a request arriving while its architecture's batch runs is prefilled and joins it at the next step. Batches
of different architectures take turns step by step, so no budget waits for another's whole generation.
A request waits in a bounded queue until there is room (`max_queue` pending: 429; waiting longer than
`queue_timeout`: 503) and may run for `request_timeout` seconds (then it ends with a 503 error).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from modeling_llamaflex.architecture import Architecture, index_key

from . import batching
from .sampling import SamplingParams, TextTracker, sample_token

logger = logging.getLogger("serving.engine")


class EngineError(Exception):
    """A request the engine refuses or could not finish: an HTTP status, a message and an OpenAI error code."""

    def __init__(self, status: int, message: str, code: str, type: str = "server_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type


@dataclass
class Token:
    text: str
    token_id: int


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: EngineError


@dataclass(eq=False)
class Job:
    """One request: its prompt, architecture and sampling, and where its events go (`sink`, called from the
    scheduler thread: it must not block)."""

    prompt_ids: list[int]
    arch: Architecture
    params: SamplingParams
    sink: object
    tokenizer: object
    eos_ids: frozenset[int] = frozenset()
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)
    first_token_at: float | None = None
    generated: int = 0

    def __post_init__(self):
        self.tracker = TextTracker(self.tokenizer, self.params.stop)
        self.generator = None

    @property
    def key(self) -> str:
        return index_key(self.arch.indices)


class _Batch:
    """Rows of one architecture decoding together."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.jobs: list[Job] = []
        self.cache = self.mask = self.tokens = None


class Engine:
    """Schedules `Job`s on `model` from one background thread (`start()` / `close()`)."""

    def __init__(self, model, pad_id: int, max_batch_size: int = 8, max_active: int = 32, max_queue: int = 64,
                 queue_timeout: float = 30.0, request_timeout: float = 600.0):
        self.model = model
        self.pad_id = pad_id
        self.max_batch_size, self.max_active, self.max_queue = max_batch_size, max_active, max_queue
        self.queue_timeout, self.request_timeout = queue_timeout, request_timeout
        self.device = model.get_input_embeddings().weight.device
        self._pending: collections.deque[Job] = collections.deque()
        self._batches: list[_Batch] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (batches of any size), for the logs and the bench

    # ---- the caller's side ----
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="llamaflex-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise EngineError(429) when `max_queue` requests are already waiting."""
        with self._wake:
            if self._stop:
                raise EngineError(503, "the server is shutting down", "shutting_down")
            if len(self._pending) >= self.max_queue:
                raise EngineError(429, f"too many requests waiting: the queue holds {self.max_queue} (--max_queue); "
                                  "retry later", "queue_full", type="rate_limit_error")
            self._pending.append(job)
            self._wake.notify()

    def load(self) -> dict:
        """What the engine holds now: waiting and running requests, batches by architecture."""
        return {"waiting": len(self._pending), "running": sum(len(b.jobs) for b in self._batches),
                "batches": [{"architecture": index_key(b.arch.indices), "rows": len(b.jobs)} for b in self._batches]}

    # ---- the scheduler thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not self._pending and not self._batches:
                        self._wake.wait(timeout=1.0)
                    if self._stop:
                        break
                    admitted = self._take_admissible()
                try:
                    self._admit(admitted)
                    for batch in list(self._batches):
                        self._guarded(batch, self._step)
                except Exception:  # noqa: BLE001 - the scheduler thread must outlive any bug in one step
                    logger.exception("scheduler step failed")
                self._batches = [b for b in self._batches if b.jobs]
        for job in [*self._pending, *(j for b in self._batches for j in b.jobs)]:
            self._fail(job, EngineError(503, "the server shut down before this request finished", "shutting_down"))

    def _take_admissible(self) -> list[Job]:
        """Pending jobs that fit now (expired ones fail), in arrival order; the others keep waiting."""
        now, room = time.monotonic(), self.max_active - sum(len(b.jobs) for b in self._batches)
        taken, kept = [], collections.deque()
        for job in self._pending:
            if job.cancelled.is_set():
                continue
            if now - job.created > self.queue_timeout:
                self._fail(job, EngineError(503, f"the server is busy: this request waited {now - job.created:.1f}s "
                                            f"in the queue (--queue_timeout {self.queue_timeout:g}s); retry later",
                                            "queue_timeout"))
            elif len(taken) < room:
                taken.append(job)
            else:
                kept.append(job)
        self._pending = kept
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs, one batch per architecture, and join them to a running batch of theirs."""
        by_arch: dict[str, list[Job]] = {}
        for job in jobs:
            by_arch.setdefault(job.key, []).append(job)
        for group in by_arch.values():
            for start in range(0, len(group), self.max_batch_size):
                chunk = group[start:start + self.max_batch_size]
                fresh = _Batch(chunk[0].arch)
                fresh.jobs = chunk
                if self._guarded(fresh, self._prefill):
                    self._guarded(fresh, self._join)

    def _join(self, fresh: _Batch) -> None:
        """Merge a prefilled batch into a running one of its architecture with room, or run it on its own."""
        if not fresh.jobs:
            return
        for batch in self._batches:
            if batch.arch.indices == fresh.arch.indices and len(batch.jobs) + len(fresh.jobs) <= self.max_batch_size:
                batch.cache, batch.mask = batching.merge(batch.cache, batch.mask, fresh.cache, fresh.mask)
                batch.tokens = torch.cat([batch.tokens, fresh.tokens])
                batch.jobs += fresh.jobs
                return
        self._batches.append(fresh)

    def _guarded(self, batch: _Batch, run) -> bool:
        """Run one step of `batch`; if it raises, fail its requests (the server goes on)."""
        try:
            run(batch)
            return True
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the others
            logger.exception("batch at %s failed", batch.arch)
            for job in batch.jobs:
                self._fail(job, EngineError(500, f"generation failed: {type(err).__name__}: {err}", "internal_error"))
            batch.jobs = []
            return False

    def _prefill(self, batch: _Batch) -> None:
        for job in batch.jobs:
            job.generator = job.params.generator(self.device)
        logits, batch.cache, batch.mask = batching.prefill(self.model, batch.arch, [j.prompt_ids for j in batch.jobs],
                                                           self.pad_id)
        self._emit(batch, logits)

    def _step(self, batch: _Batch) -> None:
        logits, batch.mask = batching.decode(self.model, batch.arch, batch.tokens, batch.cache, batch.mask)
        self.steps += 1
        self._emit(batch, logits)

    def _emit(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Sample every row's token, send it, and drop the rows that are done."""
        now, tokens, keep = time.monotonic(), [], []
        for row, job in enumerate(batch.jobs):
            token = sample_token(logits[row], job.params, job.generator)
            tokens.append(token)
            if self._advance(job, token, now):
                keep.append(row)
        batch.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if len(keep) < len(batch.jobs):
            batch.jobs = [batch.jobs[r] for r in keep]
            if keep:
                batch.cache, batch.mask = batching.select(batch.cache, batch.mask, keep)
                batch.tokens = batch.tokens[torch.tensor(keep, device=self.device)]

    def _advance(self, job: Job, token: int, now: float) -> bool:
        """Hand `token` to its job; False when the job is finished (or cancelled, or out of time)."""
        if job.cancelled.is_set():
            return False
        job.generated += 1
        job.first_token_at = job.first_token_at or now
        eos = token in job.eos_ids and not job.params.ignore_eos
        job.sink(Token("" if eos else job.tracker.add(token), token))
        if eos or job.tracker.stopped or job.generated >= job.params.max_tokens:
            rest = job.tracker.flush()
            if rest:
                job.sink(Token(rest, -1))
            reason = "length" if not (eos or job.tracker.stopped) else "stop"
            job.sink(Finished(reason, len(job.prompt_ids), job.generated))
            return False
        if now - job.created > self.request_timeout:
            self._fail(job, EngineError(503, f"generation ran past --request_timeout {self.request_timeout:g}s after "
                                        f"{job.generated} tokens", "request_timeout"))
            return False
        return True

    @staticmethod
    def _fail(job: Job, error: EngineError) -> None:
        logger.warning("request %d failed: %s", job.id, error.message)
        job.sink(Failed(error))


__all__ = ["Engine", "EngineError", "Failed", "Finished", "Job", "Token"]
