"""Clients of FUDLR: the Python SDK (`clients.sdk.Client`) and the `fudlr` command line.

The SDK speaks HTTP only; it and the client commands need none of torch, Celery or
SQLAlchemy (`pip install 'fudlr[client]'`)."""
