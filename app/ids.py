"""What an identifier may look like, wherever it enters (headers, JSON bodies, budget scopes).

Owns the one rule for user, session, feature, team, request and model ids, outcome kinds,
providers and metadata: a string of at most ``MAX_ID_LENGTH`` characters, all printable
(``str.isprintable``: no CR, LF, NUL, tab or other control character, no Unicode line
separators, bidi overrides or unassigned code points, and no lone surrogate, which is how
aiohttp hands over a header byte that is not UTF-8). Any other Unicode is fine ("Zoë", "名前").

It does not own the HTTP mapping: callers turn the problem text into a 400 naming their field.
"""

from __future__ import annotations

import unicodedata

MAX_ID_LENGTH = 256
NO_ID_LABEL = "(none)"  # what reports show for a call without a feature (or session)
# The user a call names none of is charged to (attribution). An outcome the anonymous user
# posts is stored with ``user_id`` NULL (ingest); migration 015's views (read by the reports
# and Grafana) match such an outcome to calls of this user, spelling it out in SQL
# (tests/unit/test_migration_anonymous_user.py ties the two).
ANONYMOUS_USER = "anonymous"
ESCALATED_PREFIX = "escalated_"
"""The ``error_type`` of a routed call's attempt that failed and was retried on a dearer
tier: paid (its cost counts) but not a request (no baseline, no request count), as the
warehouse's ``superseded`` (``SUPERSEDED``)."""
SUPERSEDED = f"startsWith(ifNull(error_type, ''), '{ESCALATED_PREFIX}')"
"""The warehouse's test (SQL, on ``usage_events``) of a row of such an attempt: reports and
rollups (their backfill of migration 011) read it."""


def normal_id(value: str) -> str:
    """The one spelling of an id: trimmed of HTTP's spaces (a header's value arrives
    trimmed, a body's did not) and in Unicode NFC ("Zoë" typed two ways is one id). Blank
    ("") is absent to attribution, and no budget scope."""
    return unicodedata.normalize("NFC", value.strip(" \t"))


def id_problem(value: str, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Why ``value`` is not an acceptable identifier, or None if it is."""
    if len(value) > max_length:
        return f"is longer than {max_length} characters ({len(value)})"
    if value.isprintable():
        return None
    bad = next(ch for ch in value if not ch.isprintable())
    position = value.index(bad)
    if "\udc80" <= bad <= "\udcff":
        return (
            f"is not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x} at position {position}); "
            "send UTF-8 text"
        )
    return (
        f"contains a control or non-printable character (U+{ord(bad):04X} at position "
        f"{position}); ids must be printable text of at most {max_length} characters"
    )


def scope_id_problem(value: str) -> str | None:
    """``id_problem``, for an id that names a budget scope (a user, feature, team or key):
    nor may it be the label reports give calls without one."""
    if value == NO_ID_LABEL:
        return f"may not be '{NO_ID_LABEL}': reports show that for calls without one"
    return id_problem(value)
