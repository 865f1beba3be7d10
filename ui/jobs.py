"""Running one browser session's generation through the device queue and streaming its progress.

Each browser session (gradio's session hash) has at most one job. Its `JobControl` is created when
the user presses Generate, before the job waits in the device queue (shared with the REST API, in
arrival order), so Interrupt works while it waits too, and Interrupt/Skip only ever reach that
session's own job.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from backend.job_queue import DeviceQueue
from backend.progress import JobControl, Progress


@dataclass(frozen=True)
class Running:
    progress: Progress | None
    elapsed: float
    position: int = 0  # jobs ahead in the device queue (0: running)

    @property
    def eta(self) -> float | None:
        if self.progress is None or self.progress.fraction <= 0:
            return None
        return self.elapsed / self.progress.fraction * (1 - self.progress.fraction)

    def describe(self) -> str:
        if self.position > 0:
            return f"Waiting in the queue: {self.position} job{'s' * (self.position != 1)} ahead"
        if self.progress is None:
            return "Waiting for the device..." if self.elapsed < 0.5 else f"Preparing... {self.elapsed:.0f}s"
        p = self.progress
        text = f"{p.phase + ' step' if p.phase else 'Step'} {p.step}/{p.steps}"
        if p.batches > 1:
            text += f" · batch {p.batch + 1}/{p.batches}"
        text += f" · {p.fraction:.0%} · {self.elapsed:.0f}s"
        if self.eta is not None:
            text += f" · ETA {self.eta:.0f}s"
        return text


@dataclass(frozen=True)
class Finished:
    result: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0


class SessionJob:
    """A job's control (handed to the engine) and the queue its progress reports arrive on."""

    def __init__(self, preview_every: int = 0):
        self.updates: queue.Queue[Progress] = queue.Queue()
        self.control = JobControl(on_progress=self.updates.put, preview_every=preview_every)


class JobRegistry:
    def __init__(self):
        self._jobs: dict[str, SessionJob] = {}
        self._lock = threading.Lock()

    def prepare(self, session: str, preview_every: int = 0) -> SessionJob:
        """A fresh job for `session` (replacing a finished one)."""
        job = SessionJob(preview_every)
        with self._lock:
            self._jobs[session] = job
        return job

    def job(self, session: str) -> SessionJob | None:
        with self._lock:
            return self._jobs.get(session)

    def interrupt(self, session: str) -> bool:
        job = self.job(session)
        if job is not None:
            job.control.interrupt()
        return job is not None

    def skip(self, session: str) -> bool:
        job = self.job(session)
        if job is not None:
            job.control.skip()
        return job is not None

    def finish(self, session: str, job: SessionJob) -> None:
        with self._lock:
            if self._jobs.get(session) is job:
                del self._jobs[session]


def run(work: Callable[[JobControl], Any], job: SessionJob, device: DeviceQueue, owner: str = "ui",
        kind: str = "generation", poll: float = 0.2, checkpoint: str | None = None) -> Iterator[Running | Finished]:
    """Queue `work(job.control)` on the device queue; yield `Running` as progress arrives (and every
    `poll` seconds, with the queue position while waiting), then one `Finished` with the result or
    the exception."""
    started = time.perf_counter()
    queued = device.submit(work, owner, kind, control=job.control, checkpoint=checkpoint)
    latest: Progress | None = None
    updates = job.updates
    while not queued.done:
        try:
            latest = updates.get(timeout=poll)
            while not updates.empty():  # only the newest matters
                latest = updates.get_nowait()
        except queue.Empty:
            pass
        if not queued.done:
            yield Running(latest, time.perf_counter() - started, device.position(queued))
    try:
        yield Finished(queued.wait(), None, queued.elapsed)
    except BaseException as exc:  # reported to the browser, not lost in a thread
        yield Finished(None, exc, queued.elapsed)
