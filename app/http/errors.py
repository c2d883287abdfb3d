"""Errors a client can get, in OpenAI's shape: ``{"error": {"type", "message", "param", "code"}}``.

Owns the one mapping from a failure to its HTTP status and error type: the domain errors of
``app.errors`` and a budget refusal (``BudgetRefused`` → 402) through :func:`http_error`,
and the web layer's own errors (``ApiError``). Every message names the field or limit
involved and what to do about it.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.budgets.gate import BudgetRefused
from app.errors import (
    ClientGone,
    Conflict,
    InvalidRequest,
    ModelNotServed,
    NotAuthenticated,
    NotPermitted,
    TollgateError,
    UpstreamFailed,
    UpstreamTimedOut,
)
from app.pricing.catalog import nanos_to_usd, usd_text


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param
        self.code = code
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": self.error_type,
            "message": self.message,
            "param": self.param,
            "code": self.code or self.error_type,
        }
        error.update(self.extra)
        return {"error": error}


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param)


# Domain error → (HTTP status, OpenAI error type, default code). The one table.
STATUS_OF: dict[type[TollgateError], tuple[int, str, str | None]] = {
    InvalidRequest: (400, "invalid_request_error", None),
    Conflict: (409, "conflict_error", "request_id_conflict"),
    NotAuthenticated: (401, "authentication_error", "invalid_api_key"),
    NotPermitted: (403, "permission_error", None),
    ModelNotServed: (404, "invalid_request_error", "model_not_found"),
    ClientGone: (499, "client_closed_request", None),  # nobody reads it: nginx's code
    UpstreamFailed: (502, "upstream_error", None),
    UpstreamTimedOut: (504, "upstream_timeout", None),
}


def http_error(exc: TollgateError | BudgetRefused) -> ApiError:
    """The HTTP response a domain failure becomes."""
    if isinstance(exc, BudgetRefused):
        return budget_refusal(exc)
    for kind in type(exc).__mro__:
        if kind in STATUS_OF:
            status, error_type, code = STATUS_OF[kind]
            return ApiError(status, error_type, exc.message, param=exc.field, code=exc.code or code)
    raise TypeError(f"no HTTP mapping for {type(exc).__name__}; add it to STATUS_OF")


DEFAULT_UPGRADE_PROMPT = (
    "You have reached this spending limit: upgrade your plan or ask an administrator to "
    "raise the limit, or wait until it resets."
)
# Refused under a cap that is not spent: the limit is not "reached".
DEFAULT_TOO_BIG_PROMPT = (
    "This request does not fit in what is left of this spending limit: send a smaller one "
    "(a shorter prompt, a lower max_tokens), upgrade your plan or ask an administrator to "
    "raise the limit, or wait until it resets."
)
DEFAULT_IN_FLIGHT_PROMPT = (
    "Your requests in flight hold what is left of this spending limit: retry when they have "
    "finished, upgrade your plan or ask an administrator to raise the limit."
)


def budget_refusal(refusal: BudgetRefused) -> ApiError:
    """HTTP's view of a budget refusal: 402, with what a client needs to tell its user."""
    status = refusal.status
    policy = status.policy
    # Every 402 carries a prompt a client can show its user: the policy's, or this one.
    # (a blank one, stored by a version that kept it, is none)
    upgrade_prompt = (policy.upgrade_prompt or "").strip() or (
        DEFAULT_UPGRADE_PROMPT
        if status.state == "blocked"
        else DEFAULT_IN_FLIGHT_PROMPT
        if refusal.retryable
        else DEFAULT_TOO_BIG_PROMPT
    )
    prompt = upgrade_prompt.rstrip()
    if policy.upgrade_url:
        # a sentence of its own: "Upgrade to Pro Upgrade: https://..." read as one (a probe)
        prompt += ("" if prompt.endswith((".", "!", "?", ":")) else ".") + (
            f" Upgrade: {policy.upgrade_url}"
        )
    counted = (
        f"counted by the spend worker ${nanos_to_usd(status.counted_nanos):.6f}"
        f" + not yet counted here ${nanos_to_usd(status.uncounted_nanos):.6f}"
    )
    if refusal.retryable:
        counted += f" + in flight ${nanos_to_usd(status.reserved_nanos):.6f}"
    extra: dict[str, Any] = {}
    earlier = ""
    if refusal.earlier_attempt is not None:  # an escalation refused: the first attempt was paid
        model, cost_nanos, failure = refusal.earlier_attempt
        extra = {"escalated_from": model, "charged_usd": float(nanos_to_usd(cost_nanos))}
        earlier = (
            f" This request's first attempt, on {model}, failed ({failure}) and was charged "
            f"${nanos_to_usd(cost_nanos):.6f}; its retry on a stronger model is what was refused."
        )
    return ApiError(
        402,
        "budget_exceeded",
        # "exhausted" only when it is: a prompt too big for the room left, or calls in
        # flight, refuse a call under a cap that is not spent
        f"Budget for {status.scope} "
        f"{'is exhausted' if status.state == 'blocked' else 'cannot take this request'} "
        f"({refusal.reason}): "
        f"${nanos_to_usd(status.spent_nanos):.6f} of ${usd_text(policy.limit_usd)} this {policy.period} "
        f"({counted}); resets at {status.resets_at.isoformat()}.{earlier} {prompt}",
        code="budget_exceeded",
        extra={
            **extra,
            "scope": status.scope,
            "limit_usd": float(policy.limit_usd),
            "spent_usd": float(nanos_to_usd(status.spent_nanos)),
            "period": policy.period,
            "resets_at": status.resets_at.isoformat(),
            "decided_by": status.decided_by,
            "reason": refusal.reason,
            "upgrade_url": policy.upgrade_url,
            "upgrade_prompt": upgrade_prompt,
        },
    )


def sse_error_event(exc: TollgateError) -> bytes:
    """A failure in the middle of a stream, as the SSE ``data:`` event OpenAI clients read."""
    return b"data: " + orjson.dumps(http_error(exc).body()) + b"\n\n"
