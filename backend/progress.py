"""Progress reporting and job control for one generation: interrupt (stop now, keep finished images)
and skip (abandon the current batch, go on with the next)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Progress:
    step: int  # steps done in the current pass of the current batch
    steps: int  # steps of this pass
    batch: int  # current batch index (batch count)
    batches: int
    preview: Image.Image | None = None
    phase: str = ""  # "" for the main pass, "Hires" for the hires fix's second pass
    share: tuple[float, float] = (0.0, 1.0)  # (start, length) of this pass within its batch, as fractions

    @property
    def fraction(self) -> float:
        start, length = self.share
        return (self.batch + start + length * self.step / max(1, self.steps)) / max(1, self.batches)


class JobControl:
    """Handed to `generate`; another thread may call `interrupt()` or `skip()` at any time."""

    def __init__(self, on_progress: Callable[[Progress], None] | None = None, preview_every: int = 0):
        self.on_progress = on_progress
        self.preview_every = preview_every
        # A job run elsewhere (a worker replica, `backend/cluster`): where it runs, and how an interrupt
        # or skip reaches it ("interrupt" or "skip")
        self.job_id: str | None = None
        self.worker: str | None = None
        self.on_signal: Callable[[str], None] | None = None
        self._interrupted = threading.Event()
        self._skipped = threading.Event()

    def interrupt(self) -> None:
        self._interrupted.set()
        self._forward("interrupt")

    def skip(self) -> None:
        self._skipped.set()
        self._forward("skip")

    def _forward(self, signal: str) -> None:
        if self.on_signal is not None:
            self.on_signal(signal)

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def take_skip(self) -> bool:
        """True once per skip() call; the loop that honours it clears it."""
        if self._skipped.is_set():
            self._skipped.clear()
            return True
        return False

    @property
    def should_stop_batch(self) -> bool:
        return self._interrupted.is_set() or self._skipped.is_set()

    def no_image_warning(self) -> str:
        """Why a job ended without an image. A batch that runs to its end always makes its images, so
        with no image and no interrupt, every batch was skipped."""
        stopped = "interrupted" if self.interrupted else "skipped"
        return f"{stopped} before the first image finished: no image was made"

    def wants_preview(self, step: int) -> bool:
        return self.on_progress is not None and self.preview_every > 0 and step % self.preview_every == 0

    def report(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)
