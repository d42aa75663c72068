"""FastAPI service (DESIGN.md §6): settings, database, auth, storage, one router per resource."""
