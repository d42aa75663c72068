"""Celery app and tasks (index, debias) that run the method on GPU workers (DESIGN.md §6)."""
