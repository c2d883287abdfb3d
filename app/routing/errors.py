"""The routing package's error a caller can see: a request body the router cannot read.

Owns :class:`PromptError` only, in a module of its own so that the dispatcher can catch it
without importing the signals and the failure model (numpy, River): those load on the first
routed request (:meth:`app.routing.router.Router.load_model`). It does not own validation
(:mod:`app.routing.signals` raises it) or the HTTP mapping (the dispatcher answers a 400).
"""

from __future__ import annotations


class PromptError(ValueError):
    """A request body the router cannot read; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
