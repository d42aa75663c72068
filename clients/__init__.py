"""Clients of FUDLR: the Python SDK (`clients.sdk.Client`) and the `fudlr` command line."""
