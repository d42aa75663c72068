"""The states of a debias job and of a version's training-set index, as the service stores
and sends them.

They live in the method's package, the one the service, its workers and the client all
import (the client reads them over HTTP and compares). StrEnum members equal their
values, so rows and JSON keep plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """queued → running → succeeded | failed; cancelling (asked while running) → cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# a job in one of these states is over: nothing changes it any more
TERMINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class VersionState(StrEnum):
    """indexing (its training-set index is being built) → ready | failed."""

    INDEXING = "indexing"
    READY = "ready"
    FAILED = "failed"
