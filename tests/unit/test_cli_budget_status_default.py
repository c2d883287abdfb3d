"""`tollgate budgets status 'user:*'` refuses as the API does (probe 56 F4): a default policy
spends nothing itself; before, the CLI printed ``open  no spend recorded yet``, exit 0."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from app.budgets import admin
from app.budgets.policy import PolicyBook, parse_policy
from app.cli import main


class KafkaWithADefault:
    """PolicyAdmin's reading surface: the policies topic holds ``user:*``, no decisions."""

    def __init__(self, _settings: Any) -> None:
        pass

    async def policies(self) -> PolicyBook:
        book = PolicyBook()
        book.put(parse_policy("user:*", {"period": "month", "limit_usd": 1}))
        return book

    async def read(self, _suffix: str) -> dict[str, dict[str, Any]]:
        return {}


def test_status_of_a_default_policy_is_the_apis_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin, "PolicyAdmin", KafkaWithADefault)
    result = CliRunner().invoke(main, ["budgets", "status", "user:*"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "user:* is a default policy, not a scope that spends" in lines[0]
    assert "user:<id>" in lines[0]  # says what to ask instead
    assert "no spend recorded" not in result.output
