"""The tier router's pure logic: signals, request reading, rules, escalation policy."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from app.routing import (
    EscalationPolicy,
    Failure,
    FeatureRule,
    PromptError,
    ProviderTiers,
    Router,
    RoutingSettings,
    Tier,
)
from app.routing.escalation import failure_of_completion, failure_of_status
from app.routing.signals import analyse, view_of


def _body(content: Any = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}


def _signals(body: dict[str, Any]) -> dict[str, float]:
    return analyse(view_of(body), 18).signals


# -- signals -------------------------------------------------------------------------------
PLAIN = _signals(_body())


@pytest.mark.parametrize(
    ("body", "signal"),
    [
        (_body("Fix this:\n```python\ndef f(x):\n    return x +\n```"), "code"),
        (_body("Solve the equation 3x + 4 = 19 and compute the derivative of x^2."), "math"),
        (
            _body("Think step by step and prove that the claim holds; justify each step."),
            "reasoning",
        ),
        (
            _body("Ann has twice as many pens as Bo, and 3 more than half of what Cy has."),
            "relations",
        ),
        (_body("Answer in JSON only, with exactly three keys, at most 20 words."), "constraints"),
        (_body("Which of these is not a mammal, except the whale?"), "negation"),
        (_body(max_tokens=8000), "output_size"),
        (_body(tools=[{"type": "function", "function": {"name": "f"}}]), "structured"),
        (_body(response_format={"type": "json_object"}), "structured"),
        (_body([{"type": "text", "text": "what is this?"}, {"type": "image_url"}]), "images"),
        (_body("word " * 2000), "length"),
        (
            {"messages": [{"role": "system", "content": "doc " * 500}, *_body()["messages"]]},
            "context",
        ),
    ],
)
def test_each_signal_fires_on_its_cue_and_not_on_a_plain_question(
    body: dict[str, Any], signal: str
) -> None:
    assert _signals(body)[signal] > 0
    assert PLAIN[signal] <= 0


QUESTION = "A farmer has 12 cows and buys 7 more. How many cows does the farmer have now?"
PADDING = "Background text that is not the question. " * 100  # 4,200 characters


@pytest.mark.parametrize(
    ("messages", "context_chars"),
    [
        ([{"role": "user", "content": QUESTION}], 0),
        (
            [{"role": "system", "content": PADDING}, {"role": "user", "content": QUESTION}],
            len(PADDING),
        ),
        (
            [
                {"role": "user", "content": PADDING[:2000]},
                {"role": "assistant", "content": PADDING[:1000]},
                {"role": "user", "content": QUESTION},
            ],
            3000,
        ),
        (
            [
                {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": QUESTION},
            ],
            1000 + 1 + 5,  # the image counts 1,000, its text part "x" 1, the answer 5
        ),
        (
            [{"role": "system", "content": PADDING}, {"role": "assistant", "content": QUESTION}],
            len(PADDING),
        ),
    ],
)
def test_length_is_the_question_and_everything_around_it_is_context(
    messages: list[dict[str, Any]], context_chars: int
) -> None:
    """Padding, history or documents around the question do not make it a longer question:
    on real traffic (4 KB bodies at the median) that made every call look hard."""
    signals = _signals({"messages": messages})
    assert signals["length"] == pytest.approx(_signals(_body(QUESTION))["length"])
    assert signals["context"] == pytest.approx(math.log1p(context_chars / 1000))


@pytest.mark.parametrize(
    "question",
    [
        QUESTION,
        "What is the capital of France?",
        "Write a Python function that reverses a list.",
        "Prove step by step that the sum of two odd numbers is even.",
    ],
)
def test_a_question_padded_to_4_kb_scores_about_the_same_before_learning(question: str) -> None:
    router = Router(RoutingSettings())
    bare = router.route(_body(question)).score
    padded = router.route(
        {"model": "auto", "messages": [
            {"role": "system", "content": PADDING}, {"role": "user", "content": question}
        ]}
    ).score  # fmt: skip
    assert bare is not None and padded is not None
    assert 0 < padded - bare < 0.05


def test_depth_counts_user_turns_after_the_first() -> None:
    turns = [{"role": "system", "content": "be brief"}]
    for n in range(4):
        turns += [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}]
    assert _signals({"messages": turns})["depth"] == 3
    assert PLAIN["depth"] == 0


def test_cue_signals_raise_the_cold_start_score() -> None:
    router = Router(RoutingSettings())
    plain = router.route(_body()).score
    hard = router.route(
        _body("Prove step by step that this Python code is correct:\n```\ndef f():\n    pass\n```")
    ).score
    assert plain is not None and hard is not None and hard > plain


def test_text_keys_are_the_same_in_another_process() -> None:
    """Keys must not depend on Python's per-process string hash: checkpoints move between
    processes and replicas."""
    text = "Janet's ducks lay 16 eggs per day; she sells them at $2."
    here = analyse(view_of(_body(text)), 18).keys.tolist()
    code = (
        "from app.routing.signals import analyse, view_of;"
        f"print(analyse(view_of({{'messages':[{{'role':'user','content':{text!r}}}]}}),"
        " 18).keys.tolist())"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert str(here) == there.strip()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, "max_tokens"),
    ],
)
def test_a_bad_body_is_an_error_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(PromptError) as error:
        Router(RoutingSettings()).route(
            {"model": "auto", **body} if isinstance(body, dict) else body
        )
    assert error.value.field == field


# -- rules ---------------------------------------------------------------------------------
def _settings(**rules: FeatureRule) -> RoutingSettings:
    return RoutingSettings(
        providers=(
            ProviderTiers(provider="p", economy="eco", standard="std", premium="pre"),
            ProviderTiers(provider="noeco", standard="std2", premium="pre2"),
        ),
        features=rules,
    )


HARD = "Prove step by step, with a Python implementation:\n```\ndef f():\n    return 1;\n```" + (
    " and justify every claim you make about its complexity" * 40
)


@pytest.mark.parametrize(
    ("rule", "content", "tier", "model"),
    [
        (FeatureRule(), "What is 2 + 2?", Tier.ECONOMY, "eco"),
        (FeatureRule(), HARD, Tier.STANDARD, "std"),
        (FeatureRule(premium_above=0.3), HARD, Tier.PREMIUM, "pre"),
        (FeatureRule(quality_target=0.999), "What is 2 + 2?", Tier.STANDARD, "std"),
        (FeatureRule(pin=Tier.PREMIUM), "What is 2 + 2?", Tier.PREMIUM, "pre"),
        (FeatureRule(min_tier=Tier.STANDARD), "What is 2 + 2?", Tier.STANDARD, "std"),
        (FeatureRule(max_tier=Tier.ECONOMY), HARD, Tier.ECONOMY, "eco"),
        (FeatureRule(provider="noeco"), "What is 2 + 2?", Tier.STANDARD, "std2"),
    ],
)
def test_feature_rules(rule: FeatureRule, content: str, tier: Tier, model: str) -> None:
    router = Router(_settings(f=rule))
    decision = router.route(_body(content), "f")
    assert (decision.tier, decision.model, decision.routed) == (tier, model, True)
    assert decision.reason


def test_only_auto_or_route_all_features_are_routed() -> None:
    router = Router(_settings(everything=FeatureRule(route_all=True)))
    explicit = router.route({**_body(), "model": "pre"}, "other")
    assert (explicit.routed, explicit.model, explicit.tier, explicit.score) == (
        False, "pre", Tier.PREMIUM, None,
    )  # fmt: skip
    assert router.route({**_body(), "model": "pre"}, "everything").routed
    assert router.route({**_body(), "model": "unknown-model"}).tier is None


def test_a_scored_decision_explains_itself_without_prompt_text() -> None:
    secret = "zanzibar-quokka-7781"
    decision = Router(_settings()).route(_body(f"{secret}: prove step by step"))
    assert decision.score is not None and 0 <= decision.score <= 1
    assert "reasoning" in decision.reason
    assert secret not in decision.reason


@pytest.mark.parametrize(
    "bad",
    [
        {"features": {"f": {"min_tier": "premium", "max_tier": "economy"}}},
        {"features": {"f": {"provider": "nowhere"}}},
        {"escalate_on": ["slow"]},
        {"quality_target": 1.5},
        {"providers": [{"provider": "p"}]},
    ],
)
def test_bad_routing_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RoutingSettings.model_validate(bad)


# -- escalation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (500, Failure.UPSTREAM_ERROR), (503, Failure.UPSTREAM_ERROR), (429, Failure.UPSTREAM_ERROR),
        (504, Failure.TIMEOUT), (408, Failure.TIMEOUT),
        (400, None), (404, None), (200, None),
    ],
)  # fmt: skip
def test_which_statuses_are_failures(status: int, failure: Failure | None) -> None:
    assert failure_of_status(status) is failure


def _completion(content: Any = "Paris.", finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": finish,
            }
        ]
    }


PHRASES = RoutingSettings().refusal_phrases


@pytest.mark.parametrize(
    ("completion", "failure"),
    [
        (_completion(), None),
        (_completion(None, tool_calls=[{"id": "c", "function": {"name": "f"}}]), None),
        (_completion(""), Failure.EMPTY),
        (_completion("   \n"), Failure.EMPTY),
        ({"choices": []}, Failure.EMPTY),
        (_completion("Paris is the", finish="length"), Failure.TRUNCATED),
        (_completion("", finish="content_filter"), Failure.REFUSED),
        (_completion(None, refusal="I can't do that"), Failure.REFUSED),
        (_completion("I\u2019m sorry, but I can\u2019t help with that."), Failure.REFUSED),
        (_completion("I can't help with that directly, but here is how: ..."), Failure.REFUSED),
        (_completion("Sorry for the wait: Paris."), None),
    ],
)
def test_answer_validators(completion: dict[str, Any], failure: Failure | None) -> None:
    assert failure_of_completion(completion, PHRASES) is failure


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (Tier.STANDARD, "std", 2)),
        ({"tier": Tier.STANDARD}, (Tier.PREMIUM, "pre", 2)),
        ({"tier": Tier.PREMIUM}, None),
        ({"attempt": 2}, None),
        ({"bytes_sent": 1}, None),
        ({"routed": False}, None),
        ({"feature": "no-escalation"}, None),
        ({"feature": "capped"}, (Tier.STANDARD, "std", 2)),
        ({"provider": "noeco", "tier": Tier.STANDARD}, (Tier.PREMIUM, "pre2", 2)),
    ],
)
def test_escalation_policy(kwargs: dict[str, Any], expected: tuple[Tier, str, int] | None) -> None:
    settings = _settings(
        **{
            "no-escalation": FeatureRule(escalate=False),
            "capped": FeatureRule(max_tier=Tier.ECONOMY),
        }
    )
    policy = EscalationPolicy(settings)
    arguments: dict[str, Any] = {"tier": Tier.ECONOMY, "feature": None, **kwargs}
    escalation = policy.escalation(Failure.UPSTREAM_ERROR, **arguments)
    got = None if escalation is None else (escalation.tier, escalation.model, escalation.attempt)
    assert got == expected


def test_only_configured_failure_kinds_escalate() -> None:
    policy = EscalationPolicy(RoutingSettings(escalate_on=("timeout",)))
    assert policy.escalation(Failure.TIMEOUT, tier=Tier.ECONOMY, feature=None) is not None
    assert policy.escalation(Failure.TRUNCATED, tier=Tier.ECONOMY, feature=None) is None
    assert policy.validate(_completion("", finish="length")) is Failure.TRUNCATED


def test_an_image_counts_towards_the_prompt_length() -> None:
    text_only = _signals(_body("what is in this picture?"))["length"]
    with_image = _signals(_body([{"type": "text", "text": "what is in this picture?"},
                                 {"type": "image_url", "image_url": {"url": "data:,"}}]))  # fmt: skip
    assert with_image["length"] > text_only + 1.0
