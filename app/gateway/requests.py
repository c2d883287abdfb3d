"""The chat request body (``/v1/chat/completions``, ``/v1/dispatch``) as a pydantic model.

Owns what a chat body must look like for Tollgate to admit, price and forward it: the fields
it reads (model, messages, output limits, streaming) with their bounds, and the fields only
Tollgate understands. Every other field is the provider's business: the model allows it, and
the pipeline forwards the client's own JSON (``app.gateway.pipeline.parse_chat_request``), so
a field OpenAI adds tomorrow passes through untouched. The OpenAPI document is generated
from this model.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.validation import MAX_TOKEN_COUNT, Id, NonEmptyId, int_between, int_schema

MAX_TOKENS_LIMIT = MAX_TOKEN_COUNT
OutputLimit = Annotated[
    int,
    int_between(1, MAX_TOKENS_LIMIT),
    int_schema(
        1,
        MAX_TOKENS_LIMIT,
        "The budget gate may lower it (the response says so in X-Tollgate-Max-Tokens-Capped)",
    ),
]
MAX_CHOICES = 128  # OpenAI's own limit on n: above it the provider's 400 would come back
ChoiceCount = Annotated[
    int,
    int_between(1, MAX_CHOICES),
    int_schema(1, MAX_CHOICES, "Choices to generate; the budget gate prices every one"),
]


class ChatMessage(BaseModel):
    """One message; fields besides ``role`` and ``content`` (tool calls, names...) pass through."""

    model_config = ConfigDict(strict=True, json_schema_extra={"additionalProperties": True})

    role: str
    # Checked where it is counted (``app.pricing.tokens``), which names the bad part.
    content: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object"}},
                    {"type": "null"},
                ],
                "description": "Text, or content parts ({'type': 'text', 'text': ...})",
            }
        ),
    ] = None


class ChatBody(BaseModel):
    """An OpenAI chat completion request, plus Tollgate's attribution fields."""

    # Unknown fields are not kept on the model (that costs CPU on every call) but are allowed:
    # the pipeline forwards the client's own JSON, so they reach the provider untouched.
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "additionalProperties": True,
            # OpenAI refuses stream_options unless stream is true; so does parse_chat_request
            "if": {
                "required": ["stream_options"],
                "properties": {"stream_options": {"type": "object"}},
            },
            "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
        },
    )

    model: Id | None = Field(
        default=None,
        description="Required on /v1/chat/completions; /v1/dispatch defaults it "
        "(TOLLGATE_DEFAULT_MODEL)",
    )
    messages: list[ChatMessage] = Field(
        min_length=1, description="a list of at least one message ({'role': ..., 'content': ...})"
    )
    max_tokens: OutputLimit | None = None
    max_completion_tokens: OutputLimit | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: ChoiceCount | None = None
    user: Id | None = Field(default=None, description="The user to attribute to (OpenAI's field)")
    user_id: Id | None = Field(default=None, description="The user to attribute to; not forwarded")
    session_id: Id | None = Field(default=None, description="The session; not forwarded")
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="metadata.feature (an id) attributes the call to a product feature; "
        "forwarded to the provider only on /v1/chat/completions with store: true (OpenAI "
        "refuses metadata otherwise)",
    )


class ChatCompletionBody(ChatBody):
    """``/v1/chat/completions``: as :class:`ChatBody`, with ``model`` required (OpenAI's API
    has no default model; ``/v1/dispatch`` has TOLLGATE_DEFAULT_MODEL)."""

    model: NonEmptyId = Field(description="The model to call, or a routing alias such as 'auto'")
