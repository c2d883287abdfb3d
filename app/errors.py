"""Domain errors: what went wrong with a call, in words a client can act on, without HTTP.

Owns the failures the domain packages raise (``app.metering``, ``app.gateway``): each names
the field or limit involved and the fix. It does not own statuses or response bodies:
``app.http.errors`` maps every one of these (and ``app.budgets.gate.BudgetRefused``) to its
HTTP status and OpenAI-shaped body, in one table.
"""

from __future__ import annotations


class TollgateError(Exception):
    """A failure the caller can act on. ``field`` names the offending input, if one does;
    ``code`` is a machine-readable refinement (e.g. ``max_call_duration``)."""

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


class InvalidRequest(TollgateError):
    """The request is malformed or out of bounds; ``field`` names what to change."""


class Conflict(TollgateError):
    """The request contradicts one already taken (another record under the same id)."""


class NotAuthenticated(TollgateError):
    """No usable credentials: a key is required, or the key is not known."""


class NotPermitted(TollgateError):
    """The credentials are valid but may not do this (a feature, a user, a session)."""


class ModelNotServed(TollgateError):
    """No configured upstream serves the requested model."""

    def __init__(self, model: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)[:20])
        super().__init__(
            f"The model {model!r} is not served by any configured upstream. Known models: {listed}",
            field="model",
            code="model_not_found",
        )


class ClientGone(TollgateError):
    """The client closed its connection while its call waited for room under a cap: the call
    is dropped before it reaches the provider (nothing is sent, nothing billed)."""


class UpstreamFailed(TollgateError):
    """The provider could not be reached, or broke the connection."""


class UpstreamTimedOut(TollgateError):
    """The provider was silent too long, or the call exceeded its own deadline."""
