"""The CLI and start-up checks of issue 11's security findings: no secret printed by `tollgate
config`, keys and deployment secrets generated without ever storing a key, open admin routes
refused beyond loopback, the internal token shared through the state dir."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.http.security import (
    ExposureError,
    check_exposure,
    internal_token,
    is_loopback,
    token_path,
)
from app.metering.attribution import KeyStore
from app.settings import Settings


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=env or {})
    return result.exit_code, result.output


def test_version() -> None:
    code, output = run(["--version"])
    assert code == 0 and output.startswith("tollgate, version ")


def test_config_prints_no_secret() -> None:
    targets = [
        {"name": "slack", "url": "https://hooks.slack.com/services/T0/B0/SLACKSECRET"},
        {
            "name": "pd",
            "url": "https://events.pagerduty.com/v2/enqueue",
            "format": "pagerduty",
            "routing_key": "PDROUTINGKEY",
        },
    ]
    env = {
        "TOLLGATE_ALERT_TARGETS": json.dumps(targets),
        "TOLLGATE_CLICKHOUSE_URL": "http://tollgate:CHPASSWORD@clickhouse:8123/tollgate",
        "TOLLGATE_INTERNAL_TOKEN": "INTERNALTOKEN-0123456789",
        "TOLLGATE_ADMIN_KEY": "tg-ADMINKEY",
        "TOLLGATE_SCHEMA_REGISTRY_URL": "https://user:REGISTRYPASS@registry:8081",
    }
    code, output = run(["config"], env)
    assert code == 0, output
    for secret in (
        "SLACKSECRET",
        "PDROUTINGKEY",
        "CHPASSWORD",
        "INTERNALTOKEN",
        "ADMINKEY",
        "REGISTRYPASS",
        "/services/",
    ):
        assert secret not in output, secret
    assert "slack (json) https://hooks.slack.com/…" in output
    assert "http://tollgate:***@clickhouse:8123/tollgate" in output
    assert "TOLLGATE_INTERNAL_TOKEN          (set, hidden)" in output


def test_keys_add_stores_only_the_hash_and_prints_the_key_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    result = CliRunner().invoke(
        main, ["keys", "add", "--file", str(path), "--id", "ops", "--user", "ops", "--admin"]
    )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("tg-") and len(secret) > 30
    assert secret not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = KeyStore.load(path).lookup(secret)
    assert key is not None and key.admin and key.user_id == "ops"
    again = CliRunner().invoke(
        main, ["keys", "add", "--file", str(path), "--id", "ops", "--user", "x"]
    )
    assert again.exit_code == 1 and "already has a key" in again.output
    bad = CliRunner().invoke(
        main, ["keys", "add", "--file", str(path), "--id", "a\nb", "--user", "x"]
    )
    assert bad.exit_code == 1 and "--id" in bad.output
    # `*` names the default policies user:*, team:*, feature:* (probe 54): refused, and
    # the file is left as it was
    before = path.read_text()
    for option in ("--user", "--team", "--feature"):
        args = ["--id", "star", "--user", "u", option, "*"]
        star = CliRunner().invoke(main, ["keys", "add", "--file", str(path), *args])
        assert star.exit_code == 1 and option in star.output, star.output
        assert "'*'" in star.output
    assert path.read_text() == before


def test_secrets_init_gives_compose_an_admin_key_and_an_internal_token(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    code, output = run(["secrets", "init", str(directory)])
    assert code == 0, output
    admin_key = (directory / "admin-key").read_text().strip()
    assert admin_key not in output, "the key is never printed"
    for name in ("keys.yaml", "admin-key", "internal-token"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    key = KeyStore.load(directory / "keys.yaml").lookup(admin_key)
    assert key is not None and key.admin
    settings = Settings(
        dispatcher_host="0.0.0.0",
        keys_file=directory / "keys.yaml",
        internal_token_file=directory / "internal-token",
    )
    check_exposure(settings)  # keys configured: a network bind is fine
    token = internal_token(settings)
    assert token == (directory / "internal-token").read_text().strip() and len(token) >= 32
    code, output = run(["secrets", "init", str(directory)])
    assert code == 0 and output.count("kept") == 3
    assert (directory / "admin-key").read_text().strip() == admin_key


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("dispatcher.internal", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_admin_routes_are_refused_beyond_loopback_unless_asked_for(tmp_path: Path) -> None:
    check_exposure(Settings(dispatcher_host="127.0.0.1"))
    with pytest.raises(ExposureError, match="TOLLGATE_KEYS_FILE"):
        check_exposure(Settings(dispatcher_host="0.0.0.0"))
    check_exposure(Settings(dispatcher_host="0.0.0.0", allow_open_admin=True))
    code, output = run(
        ["serve"], {"TOLLGATE_DISPATCHER_HOST": "0.0.0.0", "TOLLGATE_STATE_DIR": str(tmp_path)}
    )
    assert code == 1 and "TOLLGATE_ALLOW_OPEN_ADMIN" in output and "Traceback" not in output


def test_the_internal_token_is_shared_through_the_state_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    first = internal_token(settings)
    assert len(first) >= 32
    assert stat.S_IMODE(token_path(settings).stat().st_mode) == 0o600
    assert internal_token(Settings(state_dir=tmp_path / "state")) == first  # another process
    assert internal_token(Settings(state_dir=tmp_path / "other")) != first
    assert internal_token(Settings(internal_token="given-token-0123456789")) == (
        "given-token-0123456789"
    )
    with pytest.raises(ExposureError, match="TOLLGATE_INTERNAL_TOKEN"):
        internal_token(Settings(internal_token_file=tmp_path / "missing"))


def test_every_listener_binds_loopback_by_default() -> None:
    defaults = Settings()
    for host in (defaults.dispatcher_host, defaults.reports_host, defaults.simulator_host):
        assert host == "127.0.0.1"
    assert defaults.keys_file is None and defaults.allow_open_admin is False
