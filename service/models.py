"""Every table, imported in one place so the metadata is complete (migrations, tests)."""

from __future__ import annotations

from service.auth.models import ApiKey, Tenant
from service.base_models.models import RegisteredModel
from service.db import Base
from service.files.models import File
from service.jobs.models import Event, Job
from service.recommenders.models import Recommender, Version

__all__ = [
    "ApiKey",
    "Base",
    "Event",
    "File",
    "Job",
    "Recommender",
    "RegisteredModel",
    "Tenant",
    "Version",
]
