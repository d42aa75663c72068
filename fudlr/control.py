"""Progress reporting and cooperative cancellation, handed down by whoever runs the work.

The CLI turns progress into rich bars; a worker turns it into job progress and events
and asks the database whether the job was cancelled. Long loops call `step` between
batches, which is where cancellation takes effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fudlr.errors import FudlrError


class Cancelled(FudlrError):
    """The caller asked the work to stop; nothing was published."""


def _ignore_progress(stage: str, done: int, total: int) -> None:
    return None


def _ignore_event(message: str) -> None:
    return None


def _never_cancelled() -> bool:
    return False


@dataclass
class Control:
    """progress(stage, done, total) after each unit of work; event(message) at milestones;
    cancelled() polled between batches."""

    progress: Callable[[str, int, int], None] = field(default=_ignore_progress)
    event: Callable[[str], None] = field(default=_ignore_event)
    cancelled: Callable[[], bool] = field(default=_never_cancelled)

    def step(self, stage: str, done: int, total: int) -> None:
        """Report progress, then stop here if cancellation was requested."""
        self.progress(stage, done, total)
        if self.cancelled():
            raise Cancelled(f"cancelled during {stage} ({done}/{total})")
