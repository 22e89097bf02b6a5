"""One model-holding worker thread fed by a bounded queue, batching compatible requests into one call.

Why one thread: a diffusers pipeline is not thread-safe, and on one accelerator two concurrent calls only
slow each other down. Throughput comes from batching instead: requests that share a *key* (for text-to-image:
model, size, steps, scheduler and guidance) are computed as rows of one pipeline call, up to ``max_batch`` rows.

The queue is FIFO with respect to the oldest request: a batch always starts with the oldest waiting job and
adds later compatible ones, so an incompatible request is never starved. Jobs whose client is gone (the HTTP
side called :meth:`Job.abandon`) are dropped before they are computed; a running batch whose every job was
abandoned is aborted between denoising steps. Shutdown (:meth:`Worker.close`) refuses new jobs at once, keeps
computing queued ones for a grace period, then rejects what is left with :class:`ShuttingDown`.

Nothing here knows about HTTP or FastAPI: jobs carry ``concurrent.futures.Future`` objects.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("taiyi.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already; the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is stopping: the job was refused or rejected without being computed (503)."""


class Aborted(Exception):
    """Every job of the running batch was abandoned, so its computation was stopped."""


AbortCheck = Callable[[], bool]


@dataclass(eq=False)
class Job:
    """One request's work.

    Args:
        kind: what to run (the executor dispatches on it), e.g. ``"generate"``.
        payload: the validated request (for batchable kinds) or a callable ``payload(should_abort)``.
        rows: images this job adds to a batch.
        key: jobs with equal non-None keys may be computed together; None runs alone.
        request_id: for logs.
    """

    kind: str
    payload: Any
    rows: int = 1
    key: Hashable | None = None
    request_id: str = "-"
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False

    def abandon(self) -> bool:
        """The client left or timed out: True when the job was still queued (it will never be computed)."""
        self.abandoned = True
        return self.future.cancel()


class WorkerMetrics(Protocol):
    def batch(self, kind: str, rows: int, jobs: int, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def dropped(self, reason: str, count: int = 1) -> None: ...


class _NoMetrics:
    def batch(self, kind: str, rows: int, jobs: int, seconds: float) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def dropped(self, reason: str, count: int = 1) -> None:
        pass


Executor = Callable[[list[Job], AbortCheck], list[Any]]


class Worker:
    """The thread that owns the model.

    Args:
        execute: ``execute(jobs, should_abort) -> results`` (one result per job, same order); all jobs share
            one key (or it is a single unbatched job). ``should_abort()`` turns True when every job was
            abandoned; the executor may then raise :class:`Aborted`.
        max_batch: most rows per batch (a single job with more rows is still run, by the executor, in chunks).
        queue_size: most jobs waiting; :meth:`submit` raises :class:`QueueFull` beyond.
        batch_wait: seconds a fresh job waits for compatible company while the worker is idle.
        metrics: receives batch sizes, waits and drops.
    """

    def __init__(
        self,
        execute: Executor,
        *,
        max_batch: int,
        queue_size: int,
        batch_wait: float = 0.0,
        metrics: WorkerMetrics | None = None,
        name: str = "taiyi-worker",
    ):
        self._execute = execute
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait = batch_wait
        self._metrics = metrics or _NoMetrics()
        self._name = name
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._deadline = math.inf
        self._batch_seconds: float | None = None  # moving average, for Retry-After
        self.running: list[Job] = []

    # --- the HTTP side ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        """Jobs waiting (not counting the batch being computed)."""
        return len(self._queue)

    def queued_rows(self) -> int:
        with self._cond:
            return sum(job.rows for job in self._queue)

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises :class:`QueueFull` or :class:`ShuttingDown` instead of waiting."""
        self.start()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down and accepts no new work; retry on another instance")
            if not self.alive:
                raise ShuttingDown("the worker thread has stopped; restart the server")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
            job.enqueued_at = time.monotonic()
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def retry_after(self) -> int:
        """Seconds after which a rejected client may find room: the time to work off the current queue."""
        per_batch = self._batch_seconds if self._batch_seconds is not None else 1.0
        batches = self.queued_rows() / self.max_batch + 1
        return int(min(120, max(1, math.ceil(batches * per_batch))))

    def close(self, grace: float = 0.0) -> None:
        """Refuse new jobs; compute queued ones for ``grace`` seconds more, then reject the rest (idempotent)."""
        with self._cond:
            self._deadline = min(self._deadline, time.monotonic() + max(0.0, grace))
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has (or never started)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # --- the worker thread -------------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        kept = [job for job in self._queue if not job.future.cancelled()]
        if len(kept) != len(self._queue):
            gone = len(self._queue) - len(kept)
            self._queue = deque(kept)
            self._metrics.dropped("abandoned", gone)
            logger.info("dropped %d abandoned request(s) before computing them", gone)

    def _reject_all(self) -> None:
        rejected = 0
        while self._queue:
            job = self._queue.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before this request's turn; retry"))
                rejected += 1
        if rejected:
            self._metrics.dropped("shutdown", rejected)
            logger.warning("shutdown: rejected %d queued request(s) with 503", rejected)

    def _take(self) -> list[Job] | None:
        """The next batch (called with the lock held); None when the thread should end."""
        while True:
            self._drop_abandoned()
            if self._closing and time.monotonic() >= self._deadline:
                self._reject_all()
                return None
            if not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            head = self._queue[0]
            company = [job for job in self._queue if head.key is not None and job.key == head.key]
            if head.key is None:
                company = [head]
            waited = time.monotonic() - head.enqueued_at
            fill = sum(job.rows for job in company)
            if head.key is not None and fill < self.max_batch and waited < self.batch_wait and not self._closing:
                self._cond.wait(self.batch_wait - waited)  # a fresh job, an idle worker: let company arrive
                continue
            batch, rows = [head], head.rows
            for job in company[1:]:
                if rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
            taken = set(map(id, batch))
            self._queue = deque(job for job in self._queue if id(job) not in taken)
            return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
                if batch is None:
                    return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if len(live) < len(batch):
                self._metrics.dropped("abandoned", len(batch) - len(live))
            if not live:
                continue
            now = time.monotonic()
            for job in live:
                self._metrics.queue_wait(now - job.enqueued_at)
            self.running = live
            try:
                self._run_batch(live)
            finally:
                self.running = []

    def _run_batch(self, jobs: list[Job]) -> None:
        def should_abort() -> bool:
            return all(job.abandoned for job in jobs)

        rows = sum(job.rows for job in jobs)
        ids = ",".join(job.request_id for job in jobs)
        started = time.monotonic()
        try:
            results = self._execute(jobs, should_abort)
        except Aborted as exc:
            self._metrics.dropped("aborted", len(jobs))
            logger.info("aborted a %s batch of %d row(s): every client left [%s]", jobs[0].kind, rows, ids)
            for job in jobs:
                job.future.set_exception(exc)
            return
        except Exception as exc:
            if len(jobs) > 1:
                # One bad row (or a batch too big for memory) must not fail its neighbours: retry them alone.
                logger.warning("a batch of %d requests failed (%s); running them one by one", len(jobs), exc)
                for job in jobs:
                    self._run_batch([job])
                return
            if not _is_user_error(exc):
                logger.exception("request %s failed", ids)
            jobs[0].future.set_exception(exc)
            return
        seconds = time.monotonic() - started
        self._batch_seconds = seconds if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * seconds
        self._metrics.batch(jobs[0].kind, rows, len(jobs), seconds)
        logger.info("%s: %d row(s) of %d request(s) in %.3f s [%s]", jobs[0].kind, rows, len(jobs), seconds, ids)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)


def _is_user_error(exc: BaseException) -> bool:
    from ..errors import TaiyiError

    return isinstance(exc, TaiyiError)
