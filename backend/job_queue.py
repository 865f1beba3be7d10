"""The one queue in front of the device: every generation (web UI, REST API, job API) waits here and
starts in arrival order, one at a time on a single worker thread; with `--workers N` (a Ray Serve
cluster, `backend/cluster`) N jobs run at once, each on a thread that waits for its worker replica.

A job has an id, an owner (who may cancel it), its own `JobControl` (interrupt and skip reach only
that job), progress and an ETA while it runs, and its result or error when done. Finished jobs are
kept for a while so that their results can be fetched later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.errors import ConflictError
from backend.progress import JobControl, Progress

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
_CALLBACKS = threading.Lock()  # orders "done" against callbacks being added
FINISHED = (DONE, FAILED, CANCELLED)


class JobCancelled(ConflictError):
    """The job was cancelled before it started."""


@dataclass(eq=False)
class Job:
    work: Callable[[JobControl], Any] = field(repr=False)
    owner: str
    kind: str
    control: JobControl = field(repr=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0  # arrival order
    status: str = QUEUED
    progress: Progress | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = field(default=None, repr=False)
    error: BaseException | None = None
    request: Any = field(default=None, repr=False)  # what the client sent (the job API answers in its shape)
    checkpoint: str | None = None  # the checkpoint it runs on, when known (where it will go, with --workers)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_done: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def fraction(self) -> float:
        if self.status == DONE:
            return 1.0
        return self.progress.fraction if self.progress is not None and self.status == RUNNING else 0.0

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left, from the time taken so far and the fraction done; None before the first step."""
        if self.status != RUNNING or self.fraction <= 0:
            return None
        return self.elapsed / self.fraction * (1 - self.fraction)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the job has finished (at once if it has); it runs on the worker
        thread, so it must only hand over (an event loop's `call_soon_threadsafe`, say)."""
        with _CALLBACKS:
            if not self.done:
                self._on_done.append(callback)
                return
        callback()

    async def wait_async(self) -> Any:
        """`wait()` for an event loop: no thread is held while the job waits or runs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.when_done(lambda: loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None)))
        await future
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> Any:
        """The result, once the job has finished; re-raises the job's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.status}")
        if self.status == CANCELLED:
            raise JobCancelled(f"job {self.id} was cancelled before it started")
        if self.error is not None:
            raise self.error
        return self.result


class DeviceQueue:
    """First come, first served; `slots` threads run the jobs (1: one device in this process)."""

    def __init__(self, keep_finished: int = 200, slots: int = 1):
        if slots < 1:
            raise ValueError("a device queue needs at least one slot")
        self.keep_finished = keep_finished
        self.slots = slots
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: list[Job] = []
        self._numbers = itertools.count(1)
        self._condition = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._stopping = False

    # -- submitting and finding ------------------------------------------------------------------
    def submit(self, work: Callable[[JobControl], Any], owner: str, kind: str = "generation",
               control: JobControl | None = None, preview_every: int = 0, checkpoint: str | None = None) -> Job:
        job = Job(work, owner, kind, control or JobControl(preview_every=preview_every), checkpoint=checkpoint)
        job.control.job_id = job.id
        listener = job.control.on_progress

        def on_progress(progress: Progress) -> None:
            job.progress = progress
            if listener is not None:
                listener(progress)

        job.control.on_progress = on_progress
        with self._condition:
            job.number = next(self._numbers)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._start_worker()
            self._condition.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._condition:
            return self._jobs.get(job_id)

    def jobs_of(self, owner: str | None = None) -> list[Job]:
        """The jobs still known (waiting, running, recently finished), of one owner or of everyone."""
        with self._condition:
            return [job for job in self._jobs.values() if owner is None or job.owner == owner]

    @property
    def current(self) -> Job | None:
        """The job that has run longest of those running (the only one with one slot)."""
        with self._condition:
            return self._running[0] if self._running else None

    @property
    def running(self) -> list[Job]:
        with self._condition:
            return list(self._running)

    @property
    def queue_length(self) -> int:
        """Jobs waiting, not counting the one running."""
        with self._condition:
            return len(self._pending)

    def position(self, job: Job) -> int:
        """How many jobs start before this one: those queued ahead, plus one while every slot is busy
        (with one slot: the running job and those queued ahead); 0 once it runs."""
        with self._condition:
            if job.status != QUEUED:
                return 0
            for index, waiting in enumerate(self._pending):
                if waiting is job:
                    return index + (len(self._running) >= self.slots)
        return 0

    # -- control ---------------------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue; a running one is interrupted (it keeps finished images)."""
        with self._condition:
            if job.status == QUEUED:
                self._pending.remove(job)
                self._finish(job, CANCELLED)
                return
        job.control.interrupt()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Cancel the waiting jobs, interrupt the running ones and wait for the workers to end."""
        with self._condition:
            self._stopping = True
            for job in list(self._pending):
                self._finish(job, CANCELLED)
            self._pending.clear()
            for job in self._running:
                job.control.interrupt()
            self._condition.notify_all()
            workers = list(self._workers)
        deadline = time.monotonic() + timeout
        for worker in workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))

    # -- the workers -----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        """Called with the condition held: a thread per slot, started on first use."""
        self._workers = [worker for worker in self._workers if worker.is_alive()]
        while len(self._workers) < self.slots:
            name = "easel-device-queue" + (f"-{len(self._workers) + 1}" if self.slots > 1 else "")
            worker = threading.Thread(target=self._run, name=name, daemon=True)
            self._workers.append(worker)
            worker.start()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.status, job.started = RUNNING, time.time()
                self._running.append(job)
            try:
                job.result = job.work(job.control)
                status = DONE
            except BaseException as error:  # the job's own failure, reported to its client
                job.error = error
                status = FAILED
            with self._condition:
                self._running.remove(job)
                self._finish(job, status)

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished = status, time.time()
        with _CALLBACKS:
            job._done.set()
            callbacks, job._on_done = job._on_done, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a listener that went away (a closed event loop) must not stop the queue
                logger.exception("A job's completion callback failed")
        finished = [j for j in self._jobs.values() if j.done]
        for old in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[old.id]
