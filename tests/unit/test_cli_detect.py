"""`tollgate detect`: the volume detector over a timestamp,value CSV, from the command line."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main


def series(path: Path, spike_at: int) -> None:
    rng = random.Random(3)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with path.open("w") as handle:
        handle.write("timestamp,value\n")
        for i in range(600):
            value = 400.0 if i == spike_at else rng.gauss(100, 8)
            handle.write(f"{(start + timedelta(minutes=i)).isoformat()},{value:.1f}\n")


def test_detect_pages_the_spike(tmp_path: Path) -> None:
    source = tmp_path / "requests_per_minute.csv"
    series(source, spike_at=500)
    result = CliRunner().invoke(main, ["detect", "--kind", "volume", str(source)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["timestamp", "value", "score", "is_anomaly"]
    assert len(rows) == 600
    flagged = [i for i, row in enumerate(rows) if row["is_anomaly"] == "true"]
    assert 500 in flagged and len(flagged) <= 2
    assert "600 rows, " in result.stderr and "0 out of time order" in result.stderr


def test_detect_names_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,value\n2026-01-01T00:00:00Z,lots\n")
    result = CliRunner().invoke(main, ["detect", str(bad)])
    assert result.exit_code == 1 and "line 2" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["detect", str(bad), "--set", "no_such_knob=1"])
    assert result.exit_code == 1 and "no_such_knob" in result.output


def test_an_output_that_cannot_be_written_and_a_url_that_is_not_one_are_one_line_errors(
    tmp_path: Path,
) -> None:
    source = tmp_path / "requests_per_minute.csv"
    series(source, spike_at=500)
    nowhere = tmp_path / "missing-dir" / "out.csv"
    result = CliRunner().invoke(main, ["detect", str(source), "-o", str(nowhere)])
    assert result.exit_code != 0 and not isinstance(result.exception, FileNotFoundError)
    assert f"cannot write {nowhere}" in result.output
    listed = CliRunner().invoke(main, ["budgets", "list", "--url", "notaurl"])
    assert listed.exit_code != 0 and not isinstance(listed.exception, ValueError)
    assert "is not an http(s) URL" in listed.output


def test_report_refuses_since_and_from_together() -> None:
    both = CliRunner().invoke(main, ["report", "--since", "1h", "--from", "2026-12-01"])
    assert both.exit_code != 0 and "not both" in both.output


def test_a_stray_quote_and_a_pipe_are_one_line_errors(tmp_path: Path) -> None:
    """A newcomer's probe: one unclosed quote in a large export swallowed the rest of the
    file into one field, and csv's "field larger than field limit" came out as a
    traceback; a pipe (`/dev/stdin`, `<(...)`) said only "underlying stream is not
    seekable"."""
    import os

    quoted = tmp_path / "export.csv"
    rows = "".join(f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z,{i}\n" for i in range(3000))
    quoted.write_text('timestamp,value\n2026-01-01T00:00:00Z,"5\n' + rows * 3)
    result = CliRunner().invoke(main, ["detect", str(quoted)])
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert "line 2" in result.output and "quote" in result.output, result.output
    reader, writer = os.pipe()
    try:
        result = CliRunner().invoke(main, ["detect", f"/dev/fd/{reader}"])
    finally:
        os.close(reader)
        os.close(writer)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "not a regular file" in result.output and "save" in result.output, result.output


async def test_report_away_from_the_stack_says_where_its_token_is_and_leaves_no_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer probe: `tollgate report` run outside the directory `make up` runs in created
    a new `.tollgate/internal-token` there, sent it, and printed the reports server's "needs
    'Authorization: Bearer <token>'": nothing said which token it had used, or where the
    stack's is."""
    import asyncio

    from aiohttp import web

    from app.http.reports_api import create_reports_app

    for name in ("TOLLGATE_INTERNAL_TOKEN", "TOLLGATE_INTERNAL_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    runner = web.AppRunner(create_reports_app(None, token="the-stacks-own-token-0123456789"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    env = {"TOLLGATE_STATE_DIR": str(tmp_path / ".tollgate"), "TOLLGATE_REPORTS_PORT": str(port)}
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["report", "--since", "1h"], env=env
        )
    finally:
        await runner.cleanup()
    assert result.exit_code == 1
    token_file = tmp_path / ".tollgate" / "internal-token"
    assert str(token_file) in result.output
    assert "TOLLGATE_STATE_DIR" in result.output and "make up" in result.output
    assert not (tmp_path / ".tollgate").exists()
