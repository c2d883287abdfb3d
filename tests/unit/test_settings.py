from pathlib import Path

import pytest

from app.settings import Settings, describe_settings


def test_documented_defaults() -> None:
    settings = Settings(_env_file=None)
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.kafka_controller_port == 9093
    assert settings.dispatcher_url == "http://127.0.0.1:8700"
    assert settings.simulator_url == "http://127.0.0.1:8701"
    assert settings.state_dir == Path(".tollgate")
    assert settings.clickhouse_dsn.startswith("chdb://")
    assert settings.clickhouse_dsn.endswith("/.tollgate/chdb")
    assert settings.topic("usage") == "tollgate.usage"


def test_env_overrides_yaml_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tollgate.yaml"
    config.write_text("dispatcher_port: 9100\nkafka_bootstrap: 'kafka:9092'\n")
    monkeypatch.setenv("TOLLGATE_CONFIG", str(config))
    monkeypatch.setenv("TOLLGATE_KAFKA_BOOTSTRAP", "broker-from-env:9092")
    settings = Settings()
    assert settings.dispatcher_port == 9100  # from YAML
    assert settings.kafka_bootstrap == "broker-from-env:9092"  # env wins
    assert settings.simulator_port == 8701  # default


def test_clickhouse_url_replaces_chdb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_CLICKHOUSE_URL", "http://ch:8123")
    assert Settings().clickhouse_dsn == "http://ch:8123"


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_CONFIG", "/nonexistent/tollgate.yaml")
    with pytest.raises(FileNotFoundError, match="TOLLGATE_CONFIG"):
        Settings()


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_TOPIC_PARTITIONS", "zero")
    with pytest.raises(ValueError, match="topic_partitions"):
        Settings()


def test_every_setting_is_described() -> None:
    for row in describe_settings():
        assert row["env"].startswith("TOLLGATE_")
        assert row["description"], f"{row['env']} has no description"
