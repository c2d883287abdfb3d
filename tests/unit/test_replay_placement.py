"""Where `tollgate replay` puts a trace on the clock, and the `--start` it prints to put it
there again (the same events: counted once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from devtools.replay import _own_times, _parse_start, _place, replay_command
from devtools.trace import Attribution, read_trace

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def azure_trace(path: Path) -> Path:
    rows = [
        f"2023-11-16 18:15:{s:02d}.{s * 37 % 1000:03d}0000,{300 + s},{20 + s}" for s in range(9)
    ]
    path.write_text(AZURE_HEADER + "\n".join(rows) + "\n")
    return path


def printed_start(stderr: str) -> str:
    found = re.search(r"--start (\S+)", stderr)
    assert found, stderr
    return found[1]


def test_the_printed_start_places_a_default_replay_again_exactly(tmp_path: Path) -> None:
    """Probe J: the default placement started at a fraction of a second and printed it cut
    to the second; a resume at the printed --start made new event ids and counted the
    trace again (a 200-call slice counted 248 times after a Ctrl-C and a resume)."""
    trace = azure_trace(tmp_path / "azure.csv")
    calls = list(Attribution(seed=7)(read_trace(trace)))
    for pace in ("asap", "realtime"):
        placed = _place(calls, None, 10.0, 2, pace)  # type: ignore[arg-type]
        assert placed.start.microsecond == 0
    env = {"TOLLGATE_ANOMALY_METRICS_PORT": "0"}
    result = CliRunner().invoke(replay_command, [str(trace), "--dry-run", "-q"], env=env)
    assert result.exit_code == 0, result.output
    first = CliRunner().invoke(replay_command, [str(trace), "--dry-run"], env=env)
    start = printed_start(first.stderr)
    again = _place(calls, start, 1.0, 1, "asap")
    assert again.start == _parse_start(start)
    rerun = CliRunner().invoke(replay_command, [str(trace), "--dry-run", "--start", start], env=env)
    assert rerun.exit_code == 0, rerun.output
    assert printed_start(rerun.stderr) == start


def test_a_start_with_a_fraction_of_a_second_is_printed_with_it(tmp_path: Path) -> None:
    trace = azure_trace(tmp_path / "azure.csv")
    env = {"TOLLGATE_ANOMALY_METRICS_PORT": "0"}
    start = "2026-01-05T10:00:00.250000Z"
    result = CliRunner().invoke(
        replay_command, [str(trace), "--dry-run", "--start", start], env=env
    )
    assert result.exit_code == 0, result.output
    assert printed_start(result.stderr) == start


def test_usage_records_are_replayed_at_their_own_times_unless_moved(tmp_path: Path) -> None:
    """Probe J: JSON Lines of /v1/usage records dated last month were replayed as today's
    spend (today's budgets and reports) unless --start was given."""
    trace = tmp_path / "usage.jsonl"
    times = ["2026-11-27T12:01:30Z", "2026-11-27T12:00:00Z", "2026-11-27T12:00:45Z"]
    trace.write_text(
        "\n".join(
            json.dumps({"ts": ts, "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 2})
            for ts in times
        )
    )
    assert _own_times(trace)
    assert not _own_times(azure_trace(tmp_path / "azure.csv"))
    calls = list(Attribution(seed=7)(read_trace(trace)))
    placed = _place(calls, None, 1.0, 1, "asap", own_times=True)
    assert sorted(call.ts for call in placed) == sorted(_parse_start(ts) for ts in times)
    moved = _place(calls, "2026-11-30T00:00:00Z", 1.0, 1, "asap", own_times=True)
    assert min(call.ts for call in moved) == _parse_start("2026-11-30T00:00:00Z")
    env = {"TOLLGATE_ANOMALY_METRICS_PORT": "0"}
    result = CliRunner().invoke(replay_command, [str(trace), "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert "own times" in result.stderr and "2026-11-27T12:00:00Z" in result.stderr
