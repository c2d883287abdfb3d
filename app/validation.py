"""Request bodies as pydantic models: the shared field types and the one reading of a failure.

Owns what every request model needs: the identifier type (``Id``, the rule of ``app.ids``),
bounded integers (``TokenCount``, :func:`int_between`), USD amounts (:func:`usd_amount`, and
:func:`usd_to_nanos`, the one rounding of money to nano-dollars), and :func:`first_problem`,
which turns a pydantic ``ValidationError`` into the field to name and a message saying what
to send instead ("must be an integer from 0 to 2147483647, got -1"). The models themselves live with
the domain that owns each shape (``app.gateway.requests``, ``app.metering.ingest``,
``app.budgets.policy``); the OpenAPI document is generated from them (``app.http.openapi``).

It does not own HTTP: callers raise their domain error (``InvalidRequest``, ``PolicyError``)
with the field and message, and ``app.http.errors`` maps it to a 400.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, PlainValidator, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from app.ids import MAX_ID_LENGTH, id_problem, normal_id

MAX_TOKEN_COUNT = 2**31 - 1  # token counts are Avro ints in the events
ID_TEXT = f"Printable text (no control characters), at most {MAX_ID_LENGTH} characters"


def custom_error(message: str) -> PydanticCustomError:
    """A validator's own failure, reported by :func:`first_problem` as written."""
    return PydanticCustomError("tollgate", message)  # no context: braces are kept as written


def _checked_id(value: Any) -> str:
    if not isinstance(value, str):
        raise custom_error(
            f"must be a string of at most {MAX_ID_LENGTH} printable characters, got {_shown(value)}"
        )
    problem = id_problem(value)
    if problem is not None:
        raise custom_error(problem)
    return value


Id = Annotated[
    str,
    PlainValidator(_checked_id),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "description": ID_TEXT}),
]
"""An identifier (user, session, feature, model, request, provider...): ``app.ids``'s rule."""


NormalId = Annotated[
    str,
    PlainValidator(lambda value: normal_id(_checked_id(value))),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "description": ID_TEXT}),
]
"""An ``Id`` that links records (a request or session id an outcome or usage report names),
in its one spelling (``app.ids.normal_id``: trimmed, NFC), as attribution ids are: a retry
that trims its request id, or spells "Zoë" the other way, names the same call."""


def _checked_nonempty_id(value: Any) -> str:
    if value == "":
        raise custom_error("is required (a non-empty string)")
    return _checked_id(value)


NonEmptyId = Annotated[
    str,
    PlainValidator(_checked_nonempty_id),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "description": ID_TEXT}
    ),
]
"""An identifier that must be given (a model a call names): ``Id``, and not empty."""


def _normal_model_name(value: Any) -> str:
    """A model name in the one spelling of an id (``normal_id``: trimmed of spaces and tabs,
    NFC), then checked as one."""
    return _checked_id(normal_id(value) if isinstance(value, str) else value)


def _checked_model_name(value: Any) -> str:
    name = _normal_model_name(value)
    if not name:
        raise custom_error("is required: a model name, not empty or only spaces")
    return name


_MODEL_TEXT = ID_TEXT + "; spaces around it are trimmed"

ModelName = Annotated[
    str,
    PlainValidator(_checked_model_name),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_LENGTH,
            "pattern": r"[^ \t]",
            "description": _MODEL_TEXT + ", and it is not blank",
        }
    ),
]
"""A model a usage report names, in its one spelling (``app.ids.normal_id``): trimmed
(" gpt-4o" is gpt-4o, priced and reported as such), NFC (a name typed in decomposed
Unicode is the one a price override spells composed), and not blank (a report of model
"   " was accepted, unpriced, its spend out of the reports' totals and a blank row in spend
by model: a newcomer probe)."""

OptionalModelName = Annotated[
    str,
    PlainValidator(_normal_model_name),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "description": _MODEL_TEXT}),
]
"""As ``ModelName``, where blank ("" or spaces) means not given: the model a usage report
says was asked for is spelled as the one served is (it was not trimmed: "gpt-4o " asked for
was an unpriced model of its own, and " auto" slipped past the router alias's refusal)."""


def _integer(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise custom_error(f"must be an integer from {low} to {high}, got {_shown(value)}")
    return value


def int_between(low: int, high: int) -> PlainValidator:
    """A validator of integers from ``low`` to ``high`` (never a bool, float or numeric string)."""
    return PlainValidator(lambda value: _integer(value, low, high))


def count_between(low: int, high: int) -> PlainValidator:
    """As :func:`int_between`, but a number with no fraction (``20920.0``) is that integer:
    JSON has one number type, and JSON Schema's ``integer`` admits it (session 13's fuzzing).
    For counts a caller reports, not fields forwarded to a provider as they were sent."""

    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer() and low <= value <= high:
            return int(value)
        return _integer(value, low, high)

    return PlainValidator(check)


def number_between(low: float, high: float) -> PlainValidator:
    """A validator of optional numbers (integer or not; never a bool, string, NaN or
    infinity) from ``low`` to ``high``; null is the provider's default."""

    def check(value: Any) -> float | int | None:
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high  # NaN compares false
        ):
            raise custom_error(f"must be a number from {low:g} to {high:g}, got {_shown(value)}")
        return value

    return PlainValidator(check)


def number_schema(low: float, high: float, description: str) -> WithJsonSchema:
    return WithJsonSchema(
        {"type": ["number", "null"], "minimum": low, "maximum": high, "description": description}
    )


def int_schema(low: int, high: int, description: str | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    if description:
        schema["description"] = description
    return WithJsonSchema(schema)


TokenCount = Annotated[
    int, count_between(0, MAX_TOKEN_COUNT), int_schema(0, MAX_TOKEN_COUNT, "A token count")
]


# A USD amount written as a string: a decimal ("19.99", "5", ".5", "1e3"), which keeps cents
# exact, as money APIs accept; not a sign, NaN or Infinity, and at most 60 characters. The
# documents' patterns say the same; a positive amount's has a digit that is not 0.
# Spaces and tabs around it only: Python's \s and JSON Schema's (ECMA) \s differ (U+001C is
# one in Python only: "1\x1c" was taken here and refused by the schema, a reviewer).
USD_TEXT = r"^[ \t]*([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?[ \t]*$"
POSITIVE_USD_TEXT = r"^[ \t]*(?=[0-9.]*[1-9])" + USD_TEXT.removeprefix(r"^[ \t]*")
MAX_USD_TEXT_LENGTH = 60


def usd_amount(value: Any, high: Decimal, *, positive: bool = False) -> Decimal:
    """A USD amount sent as a JSON number or a decimal string (:data:`USD_TEXT`), finite,
    from 0 (above 0 if ``positive``) to ``high``, and not a non-zero amount held as $0 (below
    half a nano-dollar; a float is read by its shortest repr, the JSON text: 4.35 is 4.35);
    else the validator's error saying what to send. Money is held in nano-dollars: finer
    digits are rounded where it is held (:func:`usd_to_nanos`, the one rounding). The one
    reading of money in a request: a budget's ``limit_usd``, an outcome's ``value_usd``."""
    kind = "positive number" if positive else "number"
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InvalidOperation
        if isinstance(value, str) and (
            len(value) > MAX_USD_TEXT_LENGTH or not re.fullmatch(USD_TEXT, value)
        ):
            raise InvalidOperation
        amount = Decimal(str(value))
    except InvalidOperation:
        raise custom_error(
            f"must be a {kind} of USD: a number, or a decimal string such as '19.99' "
            f"(digits, no sign), got {_shown(value)}"
        ) from None
    if not amount.is_finite() or amount < 0 or (positive and amount == 0) or amount > high:
        bounds = f"above 0 and at most {high:,}" if positive else f"from 0 to {high:,}"
        raise custom_error(f"must be a number of USD {bounds}, got {_shown(value)}")
    if amount and not usd_to_nanos(amount):
        # a value that would be held as $0 (1e-10 was): refused. Finer digits of a larger one
        # are rounded to the nano-dollar where the amount is held (a float computed as
        # 100 / 30 has 16 of them: refusing it would refuse ordinary arithmetic)
        shown = str(value).strip(" \t")
        raise custom_error(f"{shown} is below the ${USD_RESOLUTION:f} resolution")
    return amount


NANOS_PER_USD = Decimal(1_000_000_000)
USD_RESOLUTION = 1 / NANOS_PER_USD  # money is held in whole nano-dollars


def usd_to_nanos(usd: Decimal) -> int:
    """``usd`` in whole nano-dollars, ties to even: the one rounding of money (here, below
    ``app.pricing``, so that reading an amount from a request rounds as holding it does)."""
    return int((usd * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def usd_schema(high: Decimal, *, positive: bool = False) -> dict[str, Any]:
    """What :func:`usd_amount` accepts, as JSON Schema."""
    return {
        "anyOf": [
            # at least one nano-dollar, the resolution money is held in, if positive
            {"type": "number", "minimum": 1e-9 if positive else 0, "maximum": int(high)},
            # a decimal string keeps cents exact ("19.99"), as money APIs accept
            {
                "type": "string",
                "pattern": POSITIVE_USD_TEXT if positive else USD_TEXT,
                "maxLength": MAX_USD_TEXT_LENGTH,
            },
        ]
    }


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(context: dict[str, Any] | None) -> str:
    expected = str((context or {}).get("expected", ""))
    return expected.replace("'", "").replace(" or ", ", ")


def first_problem(
    exc: ValidationError, model: type[BaseModel] | None = None, *, full_path: bool = False
) -> tuple[str | None, str]:
    """(field, message) of the first error: the top-level field it is in (None: the body
    itself) and what is wrong or what to send, ending in the value received; the caller
    puts the field's name in front the way its API spells it. With ``full_path`` the field
    is the whole path (``messages[0].role``) rather than its top-level field. With
    ``model``, a missing field's description says what to send."""
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if full_path and len(loc) > 1:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        loc = (f"{loc[0]}{path}",)
    field = str(loc[0]) if loc else None
    inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:]).lstrip(".")
    kind = error["type"]
    got = f", got {_shown(error.get('input'))}"
    if kind == "missing":
        if inner:
            return field, f"is missing {inner}"
        info = model.model_fields.get(field or "") if model is not None else None
        return field, f"is required: {info.description}" if info and info.description else (
            "is required"
        )
    prefix = f"{inner} " if inner else ""
    if kind == "tollgate":  # our own validators' messages, already phrased for the field
        return field, prefix + error["msg"]
    if kind == "extra_forbidden":
        return field, f"{prefix}is not a known field"
    if kind == "bool_type":
        return field, f"{prefix}must be true or false{got}"
    if kind == "string_type":
        return field, f"{prefix}must be a string{got}"
    if kind == "literal_error":
        return field, f"{prefix}must be one of {_expected(error.get('ctx'))}{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return field, f"{prefix}must be an object{got}"
    if kind == "too_short":
        least = (error.get("ctx") or {}).get("min_length", 1)
        return field, f"{prefix}must have at least {least} item{'s' if least != 1 else ''}{got}"
    if kind == "list_type":
        return field, f"{prefix}must be a list{got}"
    message = error["msg"]
    return field, f"{prefix}is invalid: {message[0].lower()}{message[1:]}{got}"
