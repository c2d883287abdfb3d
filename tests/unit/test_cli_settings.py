"""Bad settings give a one-screen error naming the variable, never a traceback or a secret."""

from __future__ import annotations

import json

from click.testing import CliRunner

from app.cli import main


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args) or ["config"], env=env)
    return result.exit_code, result.output


def test_a_malformed_setting_names_the_variable() -> None:
    code, output = run({"TOLLGATE_DISPATCHER_PORT": "eighty"})
    assert code == 1
    assert "TOLLGATE_DISPATCHER_PORT" in output and "integer" in output
    assert "Traceback" not in output


def test_an_invalid_alert_target_does_not_echo_its_secret_url() -> None:
    targets = [
        {"name": "pd", "url": "https://events.example.com/SECRET-TOKEN", "format": "pagerduty"}
    ]
    code, output = run({"TOLLGATE_ALERT_TARGETS": json.dumps(targets)})
    assert code == 1
    assert "TOLLGATE_ALERT_TARGETS" in output and "routing_key" in output
    assert "SECRET-TOKEN" not in output


def test_notify_without_targets_says_how_to_configure_them() -> None:
    code, output = run({"TOLLGATE_ALERT_TARGETS": "[]"}, "notify")
    assert code == 1 and "TOLLGATE_ALERT_TARGETS" in output
