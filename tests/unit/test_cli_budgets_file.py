"""Probe 52 F4: a budgets file with `limit_usd: -1` stopped the dispatcher with a Python
traceback through aiohttp's start-up and an "Unclosed client session" error. It is one line
naming the file, the scope and the field, before anything starts."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main


def test_a_bad_budgets_file_is_one_line_naming_scope_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "budgets.yaml"
    bad.write_text('budgets:\n  "user:zed": {period: month, limit_usd: -1}\n')
    monkeypatch.setenv("TOLLGATE_BUDGETS_FILE", str(bad))
    monkeypatch.setenv("TOLLGATE_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "budgets.user:zed" in lines[0] and "limit_usd" in lines[0] and str(bad) in lines[0]
