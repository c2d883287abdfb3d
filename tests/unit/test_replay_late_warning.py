"""`tollgate replay` says when the anomaly agent will not judge most of a replay."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from devtools.replay import replay_command


@pytest.fixture
def agent_clock() -> Iterator[tuple[int, list[float]]]:
    """An HTTP listener answering /metrics as the anomaly agent does, with its watermark."""
    watermark: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lines = ["# TYPE tollgate_anomaly_ready gauge", "tollgate_anomaly_ready 1.0"]
            if watermark:
                lines.append(f"tollgate_anomaly_watermark_timestamp_seconds {watermark[0]}")
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], watermark
    finally:
        server.shutdown()


def trace(tmp_path: Path, end: datetime, minutes: int = 30) -> Path:
    path = tmp_path / "usage.jsonl"
    rows = [
        {
            "ts": (end - timedelta(minutes=minutes - 1 - i)).isoformat(),  # the last at end
            "user_id": "u1",
            "feature": "chat",
            "model": "gpt-4o-mini",
            "prompt_tokens": 100,
            "completion_tokens": 10,
        }
        for i in range(minutes)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_replay_older_than_the_agents_clock_is_announced_as_unjudged(
    agent_clock: tuple[int, list[float]], tmp_path: Path
) -> None:
    """Session 13's probe: after 5 minutes of live traffic, a replay ending now left 3,756 of
    3,767 records late (counted, not judged by the request-rate detectors): a planted loop
    was never paged, and nothing said why."""
    port, watermark = agent_clock
    now = datetime.now(UTC)
    watermark.append(now.timestamp())
    env = {"TOLLGATE_ANOMALY_METRICS_PORT": str(port), "TOLLGATE_LOG_FORMAT": "text"}
    result = CliRunner().invoke(
        replay_command, [str(trace(tmp_path, now)), "--dry-run", "-q"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "29 of 30 calls" in result.output  # the last one ends now, within the lateness
    assert "not judge" in result.output and "--pace realtime" in result.output

    watermark[0] = (now - timedelta(hours=2)).timestamp()  # the agent is behind the trace
    quiet = CliRunner().invoke(
        replay_command, [str(trace(tmp_path, now)), "--dry-run", "-q"], env=env
    )
    assert quiet.exit_code == 0 and "not judge" not in quiet.output


def test_no_agent_listening_is_no_warning(tmp_path: Path) -> None:
    env = {"TOLLGATE_ANOMALY_METRICS_PORT": "1", "TOLLGATE_LOG_FORMAT": "text"}
    result = CliRunner().invoke(
        replay_command, [str(trace(tmp_path, datetime.now(UTC))), "--dry-run", "-q"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "not judge" not in result.output
