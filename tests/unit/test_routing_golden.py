"""The router's decisions are pinned: scores, tiers and reasons of a thousand seeded prompts.

The fixture (``routing_golden/decisions.jsonl.gz``) was recorded from the router before its
scoring was made cheaper (router7, from commit 3c6670c); the optimised router must give the
same decisions: scores within 1e-6 relative (float32 sums round differently on another
CPU), the same tier, model and reason text. The
prompts are GSM8K texts from ``data/routing`` (cold, after learning 600 outcomes over five
features as ``bench/savings_overhead.py`` does, and on the header proxy where one subject
word carries the signal), trace-sized bodies of the overhead benchmark (read head and
tail), and the cases of the router tests. ``routing_golden/checkpoint-v2.bin`` is a
checkpoint written by that same router: it must still restore, score and keep learning the
same way.

A deliberate change of the router's scores re-records the fixture:
``PYTHONPATH=. .venv/bin/python -m tests.unit.test_routing_golden --write`` (and says why in
its commit).
"""

from __future__ import annotations

import argparse
import gzip
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from app.routing import Router, RoutingSettings
from app.routing import signals as _signals
from app.routing.router import Decision, Outcome
from bench.router_quality import DEFAULT_DATA, load, proxy_header
from bench.savings_overhead import FEATURES, build_requests

HERE = Path(__file__).resolve().parent / "routing_golden"
DECISIONS = HERE / "decisions.jsonl.gz"
CHECKPOINT = HERE / "checkpoint-v2.bin"
UNWEIGHTED = HERE / "checkpoint-v2-unweighted.bin"  # written before the learned part's weight
HARD = "Prove step by step, with a Python implementation:\n```\ndef f():\n    return 1;\n```" + (
    " and justify every claim you make about its complexity" * 40
)
QUESTION = "A farmer has 12 cows and buys 7 more. How many cows does the farmer have now?"
PADDING = "Background text that is not the question. " * 100


def _body(content: Any = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}


def _special_bodies() -> list[dict[str, Any]]:
    """The router tests' cases: each signal's cue, padding, context, images, HARD."""
    return [
        _body(),
        _body("Fix this:\n```python\ndef f(x):\n    return x +\n```"),
        _body("Solve the equation 3x + 4 = 19 and compute the derivative of x^2."),
        _body("Think step by step and prove that the claim holds; justify each step."),
        _body("Ann has twice as many pens as Bo, and 3 more than half of what Cy has."),
        _body("Answer in JSON only, with exactly three keys, at most 20 words."),
        _body("Which of these is not a mammal, except the whale?"),
        _body(max_tokens=8000),
        _body(max_tokens=3),
        _body(tools=[{"type": "function", "function": {"name": "f"}}]),
        _body(response_format={"type": "json_object"}),
        _body([{"type": "text", "text": "what is this?"}, {"type": "image_url"}]),
        _body("word " * 2000),
        {
            "model": "auto",
            "messages": [{"role": "system", "content": "doc " * 500}, *_body()["messages"]],
        },
        _body(QUESTION),
        _body(PADDING + QUESTION),
        _body(QUESTION + PADDING),
        {
            "model": "auto",
            "messages": [
                {"role": "system", "content": PADDING},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": QUESTION},
            ],
        },
        _body(HARD),
        _body("What is 2 + 2?"),
        _body("Ünïcödé wörds ∑ ∫ and $ % symbols {} <> | ~ ` @ # & \\ ^"),
        _body(""),
        _body("x"),
    ]


def _record(
    router: Router, scenario: str, body: dict[str, Any], feature: str | None
) -> dict[str, Any]:
    decision = router.route(body, feature)
    return {
        "scenario": scenario,
        "feature": feature,
        "score": decision.score,
        "tier": decision.tier.value if decision.tier is not None else None,
        "model": decision.model,
        "reason": decision.reason,
    }


def _learn(router: Router, examples: list[Any], features: tuple[str, ...]) -> None:
    for index, example in enumerate(examples):
        body = {"messages": [{"role": "user", "content": example.prompt}]}
        outcome: Outcome = "success" if example.weak_correct else "failure"
        router.learn(body, "economy", outcome, features[index % len(features)])


def _checkpoint_router(data: list[Any]) -> Router:
    """What the old router wrote as ``checkpoint-v2.bin``: 150 outcomes over two features."""
    router = Router(RoutingSettings())
    _learn(router, data[1000:1150], ("a", "b"))
    return router


def decisions(checkpoint: bytes) -> Iterator[dict[str, Any]]:
    data = load(DEFAULT_DATA)
    bodies = [_body(example.prompt) for example in data]
    specials = _special_bodies()
    trace = [body for body, _ in build_requests(60, [e.prompt for e in data])]

    cold = Router(RoutingSettings())
    for body in specials + bodies[:40] + trace[:20]:
        yield _record(cold, "cold", body, None)

    learned = Router(RoutingSettings())  # as bench/savings_overhead.py learns
    _learn(learned, data[:600], FEATURES)
    for body in bodies[600:800] + specials + trace:
        for feature in (None, "chat", "no-own-model"):
            yield _record(learned, "learned", body, feature)

    header = proxy_header(data, seed=1)  # one subject word carries the signal
    subjects = Router(RoutingSettings())
    _learn(subjects, header[:400], ("s",))
    for example in header[400:520]:
        for feature in (None, "s"):
            yield _record(subjects, "header", _body(example.prompt), feature)

    restored = Router.restore(RoutingSettings(), checkpoint)
    for body in bodies[1150:1190] + specials:
        for feature in (None, "a"):
            yield _record(restored, "restored", body, feature)
    _learn(restored, data[1190:1230], ("a", "c"))
    for body in bodies[1230:1270]:
        for feature in (None, "a", "c"):
            yield _record(restored, "restored+learned", body, feature)


def _close(a: float | None, b: float | None) -> bool:
    """Scores equal up to the float32 sums' rounding: numpy adds float32 arrays in an order
    that depends on the CPU's vector instructions, so the same code on another machine
    moves a score by ~1e-9 relative (seen: 5e-10 on 178 of the 1,418 scores, a fresh model
    against the recorded checkpoint 1e-11). 1e-6 is far below what any tier or reason sees
    (reasons print two decimals)."""
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def _same(got: Decision, want: Decision) -> bool:
    return _close(got.score, want.score) and replace(got, score=None) == replace(want, score=None)


def test_decisions_are_those_recorded_before_the_router_was_optimised() -> None:
    expected = [orjson.loads(line) for line in gzip.decompress(DECISIONS.read_bytes()).splitlines()]
    actual = list(decisions(CHECKPOINT.read_bytes()))
    assert len(actual) == len(expected)
    mismatches = []
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        same = _close(got["score"], want["score"]) and all(
            got[key] == want[key] for key in ("scenario", "feature", "tier", "model", "reason")
        )
        if not same:
            mismatches.append((index, got, want))
    assert not mismatches, f"{len(mismatches)} decisions changed, first: {mismatches[0]}"


def test_the_recorded_checkpoint_is_one_the_old_router_wrote() -> None:
    """The checkpoint fixture restores to the model it was written from (same data, same
    learning): scoring after a round trip of the current code matches it too."""
    data = load(DEFAULT_DATA)
    fresh = _checkpoint_router(data)
    restored = Router.restore(RoutingSettings(), CHECKPOINT.read_bytes())
    for example in data[1150:1170]:
        for feature in (None, "a", "b"):
            assert _same(
                fresh.route(_body(example.prompt), feature),
                restored.route(_body(example.prompt), feature),
            )


def test_a_checkpoint_from_before_the_learned_weight_scores_as_it_did() -> None:
    """``checkpoint-v2-unweighted.bin`` was written before the learned part's weight existed
    (the previous ``checkpoint-v2.bin``): it restores at full weight, so an upgrade does not
    move routing, and its weight is measured once new outcomes allow."""
    data = load(DEFAULT_DATA)
    restored = Router.restore(RoutingSettings(), UNWEIGHTED.read_bytes())
    assert restored.model.learned_weight == 1.0
    for example in data[1150:1170]:
        for feature in (None, "a", "b"):
            features = restored.features(_body(example.prompt))
            full = restored.model._score(features, feature, 1.0)
            assert restored.model.score(features, feature) == full
    _learn(restored, data[1190:1340], ("a",))
    assert restored.model.learned_weight != 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description="re-record the router's golden decisions")
    parser.add_argument("--write", action="store_true", required=True)
    parser.parse_args()
    HERE.mkdir(exist_ok=True)
    CHECKPOINT.write_bytes(_checkpoint_router(load(DEFAULT_DATA)).snapshot())
    lines = [orjson.dumps(record) for record in decisions(CHECKPOINT.read_bytes())]
    DECISIONS.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
    print(f"{len(lines)} decisions -> {DECISIONS}, checkpoint {CHECKPOINT.stat().st_size} B")


if __name__ == "__main__":
    main()


_VOCABULARY = sorted(
    {w.decode() for w in _signals._CUE_WORDS}
    | {"the", "apples", "Twice", "HALF", "3", "step-by-step", "trade-off", "x^2", "no.", "do"}
    | {"```", "def", "class", "#include", "=>", ";\n", "{\n", "\n    ", "function()", "#", ">"}
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_VOCABULARY), max_size=60), st.sampled_from([" ", "\n", ", "]))
def test_cue_signals_read_from_the_cue_words_equal_those_read_from_all_words(
    words: list[str], separator: str
) -> None:
    """The signals look a prompt's cue words up in one set of every cue; reading the whole
    word set, and searching every code mark (as before router7), must give the same counts,
    repeats and pairs included."""
    text = separator.join(words)
    view = _signals.view_of(_body(text))
    tokens = view.text.encode().translate(_signals._WORD_BYTES).split()
    everything = set(tokens)  # the old reading: the prompt's whole word set
    math_marks = sum(1 for mark in _signals._MATH_MARKS if mark in view.text) + len(
        everything & _signals._MATH_WORDS
    )
    reasoning = len(everything & _signals._REASONING_WORDS) + _signals._pairs(
        everything, tokens, _signals._REASONING_PAIRS
    )
    constraints = len(everything & _signals._CONSTRAINT_WORDS) + _signals._pairs(
        everything, tokens, _signals._CONSTRAINT_PAIRS
    )
    relations = sum(map(_signals._RELATION_WORDS.__contains__, tokens))
    code_marks = sum(1 for mark in _signals._CODE_MARKS if mark in view.text)
    signals = _signals.analyse(view, 18).signals
    assert signals["code"] == (1.0 if code_marks >= 2 else 0.0)
    assert signals["math"] == min(math_marks, 5) / 5.0
    assert signals["reasoning"] == min(reasoning, 3) / 3.0
    assert signals["constraints"] == min(constraints, 4) / 4.0
    assert signals["relations"] == min(relations, 4) / 4.0
    assert signals["negation"] == (1.0 if everything & _signals._NEGATION_WORDS else 0.0)
