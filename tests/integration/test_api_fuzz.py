"""A bounded schemathesis run against a live dispatcher: no input may give a 5xx, every answer
matches the document (status, content type, headers, schema) and invalid input is refused.

The dispatcher has its own topic prefix and state dir (the ``kafka_settings`` fixture), so the
fuzzer's budget deletions touch nobody else's. The reports it proxies come from a real reports
server on an embedded ClickHouse, with the internal token, so the report routes are fuzzed end to
end instead of answering 503. The run is bounded in examples and time; it prints its case count.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app.events.topics import ensure_topics
from app.http.reports_api import create_reports_app
from app.settings import Settings
from app.warehouse.clickhouse import ReconnectingClient, migrate
from tests.integration.harness import Stack, free_port

pytestmark = pytest.mark.integration

TOKEN = "fuzz-internal-token-0123456789"
MAX_EXAMPLES = 40  # per operation and phase; about a minute on a busy 2-core machine
MAX_TIME_S = 60


def test_no_input_gives_a_server_error(
    kafka_settings: Settings, clickhouse: Any, tmp_path: Path
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    migrate(clickhouse)
    reports_port = free_port()
    stack = Stack(kafka_settings, reports_port=reports_port, internal_token=TOKEN)

    async def start_reports() -> web.AppRunner:
        app = create_reports_app(ReconnectingClient(lambda: clickhouse), token=TOKEN)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", reports_port).start()
        return runner

    reports_runner = stack.loop.run(start_reports())
    stack.start()
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{stack.url}/openapi.json",
                # Every check a newcomer's plain `schemathesis run` makes, but one: schema-
                # valid data may still be refused where no static schema can say why (event
                # times in the lateness window, cached_tokens <= prompt_tokens, report ranges
                # of at most 400 days, non-printable ids): tests/unit/test_openapi_agreement.py
                # checks, case by case, that the document and the API agree elsewhere.
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--max-time",
                str(MAX_TIME_S),
                "--workers",
                "1",  # threads: CPython 3.11's ast.parse is not thread-safe under hypothesis
                "--seed",
                "11",
                "--request-timeout",
                "30",
                "--phases",
                "examples,coverage,fuzzing",
                "--suppress-health-check",
                "all",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=MAX_TIME_S + 240,
            cwd=tmp_path,  # its report directory, if any, stays in the test's scratch space
        )
    finally:
        stack.loop.run(reports_runner.cleanup())
        stack.stop()
    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.log").write_text(output)
    print(output[-6000:])
    cases = re.search(r"Test cases:\s*([\d,]+) generated", output)
    assert cases is not None, output[-3000:]
    print(f"schemathesis: {cases.group(1)} cases")
    assert result.returncode == 0, output[-6000:]
    assert int(cases.group(1).replace(",", "")) >= 500, (
        "the run generated too few cases to mean much"
    )
