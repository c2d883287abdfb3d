"""Escalation policy: which failures of a routed call are retried once on the next tier up.

Owns the classification of a failed attempt (:class:`Failure`: upstream error, timeout,
empty, truncated or refused output) and the rule deciding whether it escalates. It does
not own the retry itself, the Usage events of each attempt, or streaming (the dispatcher
does those: each attempt is its own Usage event with an ``attempt`` number and the same
request id, so both calls are paid and counted).

The rule, in order:

1. Only routed calls escalate, at most once (``attempt`` 1 may be followed by attempt 2).
2. A stream escalates only before its first byte reached the client (the dispatcher holds a
   routed stream until its content can no longer open with a refusal phrase, or does:
   :func:`may_open_with_refusal`, :func:`opens_with_refusal`).
3. The feature's rule may say ``escalate: false``; ``routing.escalate_on`` lists the kinds.
4. There must be a tier above the one that failed at the same provider.

Client errors (a 4xx other than 408 and 429) do not escalate: the request itself is wrong
and a bigger model would refuse it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.routing.config import TIER_ORDER, ProviderTiers, RoutingSettings, Tier

MAX_ATTEMPTS = 2


class Failure(StrEnum):
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    EMPTY = "empty"
    TRUNCATED = "truncated"
    REFUSED = "refused"


def failure_of_status(status: int) -> Failure | None:
    """The failure an upstream HTTP status means, or None (success, or the client's fault)."""
    if status in (408, 504):
        return Failure.TIMEOUT
    if status == 429 or status >= 500:
        return Failure.UPSTREAM_ERROR
    return None


def failure_of_completion(
    body: Mapping[str, Any], refusal_phrases: tuple[str, ...] = ()
) -> Failure | None:
    """Validate a non-streamed ``chat.completion`` body: empty, truncated or refused output.

    An answer with tool calls is not empty. ``finish_reason`` ``length`` is truncated,
    ``content_filter`` and a non-empty ``refusal`` are refused, and so is content that opens
    with one of ``refusal_phrases`` (lower case).
    """
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return Failure.EMPTY
    choice: Mapping[str, Any] = choices[0] if isinstance(choices[0], Mapping) else {}
    raw_message = choice.get("message")
    message: Mapping[str, Any] = raw_message if isinstance(raw_message, Mapping) else {}
    finish = choice.get("finish_reason")
    if finish == "content_filter" or message.get("refusal"):
        return Failure.REFUSED
    if finish == "length":
        return Failure.TRUNCATED
    content = message.get("content")
    text = content.strip() if isinstance(content, str) else ""
    if not text and not message.get("tool_calls") and not message.get("function_call"):
        return Failure.EMPTY
    if opens_with_refusal(text, refusal_phrases):
        return Failure.REFUSED
    return None


def _opening(text: str) -> str:
    return text.lstrip()[:200].lower().replace("\u2019", "'")


def opens_with_refusal(text: str, refusal_phrases: tuple[str, ...]) -> bool:
    """Whether ``text`` (leading whitespace ignored, any case, typographic apostrophes read as
    ``'``) opens with one of ``refusal_phrases`` (lower case)."""
    opening = _opening(text)
    return any(opening.startswith(phrase) for phrase in refusal_phrases)


def may_open_with_refusal(text: str, refusal_phrases: tuple[str, ...]) -> bool:
    """Whether more text could still make ``text`` open with a refusal phrase (it is, read as
    :func:`opens_with_refusal` reads it, the start of one): a stream is held while it is."""
    opening = _opening(text)
    return any(phrase.startswith(opening) for phrase in refusal_phrases)


@dataclass(frozen=True, slots=True)
class Escalation:
    tier: Tier
    model: str
    attempt: int


def next_tier(provider: ProviderTiers, tier: Tier) -> Tier | None:
    """The next tier up that the provider has a model for, or None at the top."""
    for candidate in TIER_ORDER[tier.rank + 1 :]:
        if provider.model_for(candidate):
            return candidate
    return None


class EscalationPolicy:
    def __init__(self, settings: RoutingSettings) -> None:
        self.settings = settings
        self.kinds = frozenset(Failure(kind) for kind in settings.escalate_on)

    def validate(self, completion: Mapping[str, Any]) -> Failure | None:
        """The configured validators on a non-streamed answer (None = acceptable)."""
        return failure_of_completion(completion, self.settings.refusal_phrases)

    @property
    def stream_refusal_phrases(self) -> tuple[str, ...]:
        """The phrases a held stream is judged on: none when refusals do not escalate."""
        return self.settings.refusal_phrases if Failure.REFUSED in self.kinds else ()

    def possible(
        self, *, tier: Tier, feature: str | None, attempt: int = 1, provider: str | None = None
    ) -> bool:
        """Whether some failure of ``attempt`` on ``tier`` would escalate (a stream is then held
        until its first content, so that it still can)."""
        rule = self.settings.rule_for(feature)
        if attempt >= MAX_ATTEMPTS or not self.kinds or not rule.escalate:
            return False
        return next_tier(self.settings.provider_tiers(provider or rule.provider), tier) is not None

    def escalation(
        self,
        failure: Failure,
        *,
        tier: Tier,
        feature: str | None,
        attempt: int = 1,
        routed: bool = True,
        bytes_sent: int = 0,
        provider: str | None = None,
    ) -> Escalation | None:
        """The attempt to make after ``failure`` of ``attempt`` on ``tier``, or None."""
        rule = self.settings.rule_for(feature)
        if not routed or attempt >= MAX_ATTEMPTS or bytes_sent > 0:
            return None
        if failure not in self.kinds or not rule.escalate:
            return None
        tiers = self.settings.provider_tiers(provider or rule.provider)
        up = next_tier(tiers, tier)
        if up is None:
            return None
        model = tiers.model_for(up)
        assert model is not None
        return Escalation(up, model, attempt + 1)
