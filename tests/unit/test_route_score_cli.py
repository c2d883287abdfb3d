"""``tollgate route score``: the live router's code over JSON Lines, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.cli import main
from app.routing import Router, RoutingSettings

PROMPTS = [
    "What is 2 + 2?",
    "Prove step by step that the sum of two even numbers is even.",
    "Write a Python function that parses ISO 8601 dates:\n```\ndef parse(s):\n    ...\n```",
]
FEEDBACK = [
    ("What is 3 + 5?", "economy", "success"),
    ("Prove that there are infinitely many primes.", "economy", "failure"),
    ("Prove that sqrt(2) is irrational.", "premium", "success"),  # not economy: not learned
    ("Prove the triangle inequality.", "economy", "failure"),
]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    prompts = _write(tmp_path / "prompts.jsonl", [{"messages": _messages(p)} for p in PROMPTS])
    feedback = _write(
        tmp_path / "feedback.jsonl",
        [{"messages": _messages(t), "tier": tier, "outcome": o} for t, tier, o in FEEDBACK],
    )
    return prompts, feedback


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, ["route", "score", *args])


def test_scores_match_the_live_router_after_the_same_learning(files: tuple[Path, Path]) -> None:
    prompts, feedback = files
    result = _run("--feedback", str(feedback), str(prompts))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(PROMPTS)
    live = Router(RoutingSettings())
    for text, tier, outcome in FEEDBACK:
        live.learn({"messages": _messages(text)}, tier, outcome)  # type: ignore[arg-type]
    for line, text in zip(lines, PROMPTS, strict=True):
        decision = live.route({"model": "auto", "messages": _messages(text)})
        assert set(line) == {"score", "tier", "reason"}
        assert line["score"] == round(decision.score or 0, 6)
        assert line["tier"] == decision.tier
        assert line["reason"] == decision.reason
    assert "learned 3 of 4 feedback lines" in result.stderr


def test_feedback_moves_the_scores(files: tuple[Path, Path]) -> None:
    prompts, feedback = files
    cold = [json.loads(x)["score"] for x in _run(str(prompts)).stdout.splitlines()]
    warm = [json.loads(x)["score"] for x in _run("--feedback", str(feedback), str(prompts)).stdout.splitlines()]  # fmt: skip
    assert cold != warm


def test_save_then_load_equals_learning_in_one_run(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    prompts, feedback = files
    model = tmp_path / "router.bin"
    once = _run("--feedback", str(feedback), str(prompts)).stdout
    assert _run("--feedback", str(feedback), "--save", str(model), str(prompts)).exit_code == 0
    assert _run("--load", str(model), str(prompts)).stdout == once


@pytest.mark.parametrize(
    ("which", "line", "expected"),
    [
        ("prompts", "{not json", "line 2: not valid JSON"),
        ("prompts", "[1, 2]", "line 2: must be a JSON object"),
        ("prompts", '{"text": "hi"}', "line 2: messages: is required"),
        ("prompts", '{"messages": [{"role": "user", "content": 5}]}', "line 2: messages[0].content"),
        ("prompts", '{"messages": [{"role": "user", "content": "x"}], "feature": 3}', "line 2: feature"),
        ("feedback", '{"messages": [{"role": "user", "content": "x"}], "outcome": "success"}', "line 2: tier"),
        ("feedback", '{"messages": [{"role": "user", "content": "x"}], "tier": "economy", "outcome": "ok"}', "line 2: outcome"),
        ("feedback", '{"tier": "economy", "outcome": "failure"}', "line 2: messages"),
    ],
)  # fmt: skip
def test_a_bad_line_is_an_error_naming_the_line_and_field(
    tmp_path: Path, which: str, line: str, expected: str
) -> None:
    good = {"messages": _messages("hi"), "tier": "economy", "outcome": "success"}
    path = tmp_path / f"{which}.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    prompts = path if which == "prompts" else _write(tmp_path / "p.jsonl", [good])
    args = [str(prompts)] if which == "prompts" else ["--feedback", str(path), str(prompts)]
    result = _run(*args)
    assert result.exit_code == 1
    assert f"{path} {expected}" in result.stderr


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    result = _run(str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 1
    assert "nope.jsonl: cannot read it" in result.stderr
