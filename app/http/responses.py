"""Response shapes of the dispatcher's JSON routes, for the OpenAPI document only.

Owns what ``/openapi.json`` says the dispatcher answers. Nothing validates or re-serialises
a response through these models: handlers build their JSON directly, and a provider's body
is passed through as bytes (unknown provider fields survive, and it costs no CPU), so the
chat completion model lists the usual fields and allows any others.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(json_schema_extra={"additionalProperties": True})


class ErrorDetail(_Open):
    type: str = Field(description="e.g. invalid_request_error, budget_exceeded")
    message: str = Field(description="What went wrong and what to do about it")
    param: str | None = Field(default=None, description="The field or header to change")
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape; a 402 adds scope, limit_usd, spent_usd, resets_at..."""

    error: ErrorDetail


class ChatCompletion(_Open):
    """The provider's completion, passed through unchanged (or an SSE stream of chunks)."""

    id: str | None = None
    object: str | None = None
    model: str | None = None
    choices: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, Any] | None = None


class AcceptedUsage(BaseModel):
    event_id: str
    request_id: str
    cost_usd: str
    price_unknown: bool
    budget_cost_usd: str = Field(
        description="What budgets count for it: cost_usd, or for a model without a price "
        "(price_unknown) its cost at the baseline model's price; reports keep cost_usd 0 "
        "for those and count them in unpriced_requests"
    )
    model_requested_price_unknown: bool = Field(
        default=False,
        description="The record's model_requested has no price: its requested cost is the "
        "served model's, so the reports count no routing saving for it (it falls under model "
        "choice); name a priced model to count one",
    )
    repeat: bool = Field(
        default=False,
        description="The record repeats one already accepted under its request_id (a retry, "
        "or twice in one batch): the same event, counted once with the first",
    )


class UsageAccepted(BaseModel):
    accepted: int = Field(description="Records accepted, repeats included")
    repeated: int = Field(
        default=0,
        description="How many of them repeat a record already accepted under its request_id "
        "(events[].repeat): counted once, so accepted - repeated calls were added",
    )
    events: list[AcceptedUsage]
    ignored_fields: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Fields of a record that nothing reads (a typo such as 'feture', another "
        "API's name such as 'timestamp' for 'ts'), by record: {'records[0]': ['feture']}",
    )


class OutcomesAccepted(BaseModel):
    accepted: int
    event_ids: list[str]
    ignored_fields: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Fields of a record that nothing reads (a typo such as 'feture', another "
        "API's name such as 'timestamp' for 'ts'), by record: {'outcomes[0]': ['feture']}",
    )
    unmatched: list[str] = Field(
        default_factory=list,
        description="Records whose request_id (or session_id) names no call this dispatcher "
        "has seen, e.g. ['outcomes[0].request_id']: they are counted under the caller's own "
        "user and feature (its headers or fields), not the call's. A call through another "
        "dispatcher, or from before a restart, cannot be told from a typo here",
    )


class PolicyOut(BaseModel):
    scope: str
    period: Literal["day", "month", "window"]
    limit_usd: str
    thresholds: list[float]
    timezone: str
    window_seconds: int | None
    upgrade_url: str | None
    upgrade_prompt: str | None
    updated_by: str | None = Field(
        default=None,
        description="Who set it last: 'budgets_file' (TOLLGATE_BUDGETS_FILE at a dispatcher "
        "start), 'cli', the admin's API key id, or null (an admin API without keys)",
    )
    warning: str | None = Field(
        default=None,
        description="Present when the policy is stored but caps no call yet, e.g. a key: "
        "scope with no such API key configured",
    )


class PolicyList(BaseModel):
    budgets: list[PolicyOut]


class Deleted(BaseModel):
    deleted: str


class BudgetStatusOut(_Open):
    scope: str
    state: Literal["open", "warn", "blocked"]
    decided_by: str | None = None
    period: str
    limit_usd: str
    spent_usd: str
    remaining_usd: str
    period_start: str
    resets_at: str
    breakdown: dict[str, str]
    worker_decision: dict[str, Any] | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Any]


class Report(_Open):
    """A report from the warehouse (its fields depend on the report)."""
