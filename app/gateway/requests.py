"""The chat request body (``/v1/chat/completions``, ``/v1/dispatch``) as a pydantic model.

Owns what a chat body must look like for Tollgate to admit, price and forward it: the fields
it reads (model, messages, output limits, streaming) with their bounds, and the fields only
Tollgate understands. Every other field is the provider's business: the model allows it, and
the pipeline forwards the client's own JSON (``app.gateway.pipeline.parse_chat_request``), so
a field OpenAI adds tomorrow passes through untouched. The OpenAPI document is generated
from this model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.validation import (
    MAX_TOKEN_COUNT,
    Id,
    NonEmptyId,
    int_between,
    int_schema,
    number_between,
    number_schema,
)

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


# Sampling parameters in OpenAI's ranges: outside them the provider refuses the call with a
# 400, so the gateway refuses it first (nothing admitted, nothing charged).
Temperature = Annotated[
    float | int | None,
    number_between(0, 2),
    number_schema(0, 2, "Sampling temperature (OpenAI's range, 0 to 2)"),
]
TopP = Annotated[
    float | int | None, number_between(0, 1), number_schema(0, 1, "Nucleus sampling mass (0 to 1)")
]
Penalty = Annotated[
    float | int | None,
    number_between(-2, 2),
    number_schema(-2, 2, "Presence or frequency penalty (-2 to 2)"),
]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
CONTENT_GIVEN: dict[str, Any] = {
    "required": ["content"],
    "properties": {"content": {"not": {"type": "null"}}},
}
NONEMPTY_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}


def _role_needs(role: str, name: str) -> dict[str, Any]:
    """A ``role`` message must give ``name`` as a non-empty string (:func:`message_call_problem`)."""
    return {
        "if": {"required": ["role"], "properties": {"role": {"const": role}}},
        "then": {"required": [name], "properties": {name: NONEMPTY_TEXT}},
    }


# Each tool call has an id, and a function call ("type" absent or "function") a function name.
TOOL_CALL: dict[str, Any] = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": NONEMPTY_TEXT},
    "if": {"properties": {"type": {"const": "function"}}},
    "then": {
        "required": ["function"],
        "properties": {
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": NONEMPTY_TEXT},
            }
        },
    },
}


class ChatMessage(BaseModel):
    """One message; fields besides ``role`` and ``content`` (tool calls, names...) pass through.
    ``content`` is required (not null) except on an assistant turn that calls a tool or a
    function (OpenAI's rule; :func:`message_content_problem`); the ids linking tool calls and
    their answers are required too (:func:`message_call_problem`)."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "additionalProperties": True,
            "if": {"required": ["role"], "properties": {"role": {"const": "assistant"}}},
            "then": {
                "anyOf": [
                    CONTENT_GIVEN,
                    {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array"}}},
                    {
                        "required": ["function_call"],
                        "properties": {"function_call": {"type": "object"}},
                    },
                ]
            },
            "else": CONTENT_GIVEN,
            "allOf": [
                _role_needs("tool", "tool_call_id"),
                _role_needs("function", "name"),
                {"properties": {"tool_calls": {"items": TOOL_CALL}}},
            ],
        },
    )

    role: Role
    # Checked where it is counted (``app.pricing.tokens``), which names the bad part.
    content: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object"}, "minItems": 1},
                    {"type": "null"},
                ],
                "description": "Text, or content parts ({'type': 'text', 'text': ...}); "
                "an empty list is refused",
            }
        ),
    ] = None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` is a boolean (OpenAI refuses another type: a
    string ``"false"`` was read as true here, and the client got the usage chunk it declined);
    other options pass through to the provider."""

    model_config = ConfigDict(strict=True, json_schema_extra={"additionalProperties": True})

    include_usage: bool | None = Field(
        default=None, description="Send a final chunk with the stream's usage (choices: [])"
    )


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
        min_length=1,
        description="a list of at least one message ({'role': ..., 'content': ...}); a 'tool' "
        "message answers a call in the tool_calls of the assistant message before it (other "
        "tool messages between them)",
    )
    max_tokens: OutputLimit | None = None
    max_completion_tokens: OutputLimit | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount | None = None
    temperature: Temperature = None
    top_p: TopP = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    user: Id | None = Field(default=None, description="The user to attribute to (OpenAI's field)")
    user_id: Id | None = Field(default=None, description="The user to attribute to; not forwarded")
    safety_identifier: Id | None = Field(
        default=None,
        description="OpenAI's; the user to attribute to when neither user nor user_id is given",
    )
    session_id: Id | None = Field(default=None, description="The session; not forwarded")
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="metadata.feature (an id) attributes the call to a product feature; "
        "forwarded to the provider only on /v1/chat/completions with store: true (OpenAI "
        "refuses metadata otherwise)",
    )


def message_content_problem(message: dict[str, Any]) -> str | None:
    """What is wrong with a (validated) message's content, or None: it is required and not
    null, except on an assistant turn with ``tool_calls`` or ``function_call``; a list of
    parts is not empty (OpenAI refuses one; it was served and billed here, probe L)."""
    if message.get("content") == []:
        return "is an empty list of content parts: send text, or at least one part"
    if message.get("content") is not None:
        return None
    if message.get("role") == "assistant" and (
        isinstance(message.get("tool_calls"), list)
        or isinstance(message.get("function_call"), dict)
    ):
        return None
    if message.get("role") == "assistant":
        malformed = [
            f"its {name} is {_json_type(message[name])}, not {what}"
            for name, what in (("tool_calls", "a list"), ("function_call", "an object"))
            if message.get(name) is not None
        ]
        # (a string of tool_calls read "required unless the turn has tool_calls": a newcomer's
        # probe; it has them, in the wrong shape)
        return "is required (text or content parts) unless the turn has tool_calls" + (
            f" ({'; '.join(malformed)})" if malformed else ""
        )
    return f"is required on a {message.get('role')!r} message (text or content parts)"


def message_call_problem(message: dict[str, Any]) -> tuple[str, str] | None:
    """(where in the message, what is wrong) if a (validated) message lacks an id OpenAI
    requires to link tool calls and their answers, else None: a ``tool`` message's
    ``tool_call_id``, a ``function`` message's ``name``, and in an assistant's ``tool_calls``
    each call's ``id`` and (a function call: ``type`` absent or "function") its
    ``function.name``. OpenAI refuses each with a 400 ("Missing required parameter:
    'messages[2].tool_call_id'"); a tool message without one was forwarded and charged (a
    newcomer probe). Only the ids are checked: the rest of a call is the provider's."""
    role = message.get("role")
    if role == "tool" and (problem := _id_problem(message, "tool_call_id")):
        return "tool_call_id", f"{problem} on a 'tool' message: the id of the tool call it answers"
    if role == "function" and (problem := _id_problem(message, "name")):
        return "name", f"{problem} on a 'function' message: the function's name"
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        # (a number here was a 500 in the tool-answer check: a review)
        return "tool_calls", f"must be a list of tool calls, not {_json_type(calls)}"
    for index, call in enumerate(calls or []):
        where = f"tool_calls[{index}]"
        if not isinstance(call, dict):
            shape = "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': ...}}"
            return where, f"must be an object ({shape}), not {_json_type(call)}"
        if problem := _id_problem(call, "id"):
            said = "the call's id, which the tool message answering it names in tool_call_id"
            return f"{where}.id", f"{problem}: {said}"
        if call.get("type", "function") != "function":
            continue  # a custom tool call ({"type": "custom", "custom": ...}) has no function
        function = call.get("function")
        if not isinstance(function, dict):
            shape = "is required" if function is None else f"is {_json_type(function)}, not"
            return f"{where}.function", f"{shape} an object ({{'name': ..., 'arguments': ...}})"
        if problem := _id_problem(function, "name"):
            return f"{where}.function.name", f"{problem}: the name of the function called"
    return None


def tool_answer_problem(messages: list[Any]) -> tuple[int, str] | None:
    """(index, what is wrong) of the first ``tool`` message that answers no tool call of the
    assistant message it follows, else None. OpenAI's rule: a tool message follows the
    assistant message whose ``tool_calls`` hold its ``tool_call_id``, directly or after other
    answers to them (parallel calls); elsewhere it is a 400 ("messages with role 'tool' must be
    a response to a preceding message with 'tool_calls'", or "'tool_call_id' of 'c9' not found
    in 'tool_calls' of previous message") that cost a round trip. Legacy ``function``
    messages are not checked (nor skipped over: OpenAI pairs tool answers with tool calls).
    Run after :func:`message_call_problem` (the ids are non-empty strings by then)."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            continue
        before = index - 1
        while before >= 0 and _role(messages[before]) == "tool":
            before -= 1
        calls = messages[before].get("tool_calls") if before >= 0 else None
        if _role(messages[before] if before >= 0 else None) != "assistant" or not calls:
            where = "the first message" if before < 0 else f"messages[{before}]"
            return index, (
                f"answers no tool call: a 'tool' message must follow the assistant message "
                f"whose tool_calls hold its id (other tool messages may come between), and "
                f"{where} is no assistant message with tool_calls. Put the assistant turn "
                "that made the call before it, or drop the tool message"
            )
        ids = [c.get("id") for c in calls if isinstance(c, dict)]
        if message.get("tool_call_id") not in ids:
            return index, (
                f"{message.get('tool_call_id')!r} is not the id of a tool call of the assistant "
                f"message it answers (messages[{before}] called {', '.join(map(repr, ids))}): "
                "use the id of the call this message answers"
            )
    return None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _id_problem(holder: dict[str, Any], name: str) -> str | None:
    """Why ``holder[name]`` is not a non-empty string, or None."""
    value = holder.get(name)
    if isinstance(value, str) and value:
        return None
    shown = "" if value is None else f", got {value!r}"[:80]
    return f"is required (a non-empty string){shown}"


def _json_type(value: Any) -> str:
    """How JSON calls ``value``'s type: "a string", "a number", ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


class ChatCompletionBody(ChatBody):
    """``/v1/chat/completions``: as :class:`ChatBody`, with ``model`` required (OpenAI's API
    has no default model; ``/v1/dispatch`` has TOLLGATE_DEFAULT_MODEL)."""

    model: NonEmptyId = Field(description="The model to call, or a routing alias such as 'auto'")
