"""docker-compose.yml cannot run here (no Docker engine), so check it agrees with the settings."""

from pathlib import Path

import yaml

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DEFAULTS = Settings()


def _host_port(service: str, container_port: int) -> str:
    for mapping in COMPOSE["services"][service]["ports"]:
        parts = str(mapping).split(":")
        if int(parts[-1]) == container_port:
            return ":".join(parts[:-1])
    raise AssertionError(f"{service} does not publish {container_port}")


def test_required_services_exist() -> None:
    for name in (
        "kafka",
        "clickhouse",
        "grafana",
        "simulator",
        "topics",
        "dispatcher",
        "spend-worker",
        "sink",
        "anomaly",
        "notifier",
    ):
        assert name in COMPOSE["services"], name
    # The dispatcher proxies reports to the sink, which must listen beyond its container.
    dispatcher_env = COMPOSE["services"]["dispatcher"]["environment"]
    assert dispatcher_env["TOLLGATE_REPORTS_HOST"] == "sink"
    assert COMPOSE["services"]["sink"]["environment"]["TOLLGATE_REPORTS_HOST"] == "0.0.0.0"


def test_host_ports_match_settings_defaults() -> None:
    assert _host_port("kafka", 9092) == DEFAULTS.kafka_bootstrap
    assert _host_port("simulator", DEFAULTS.simulator_port) == (
        f"{DEFAULTS.simulator_host}:{DEFAULTS.simulator_port}"
    )
    assert _host_port("dispatcher", DEFAULTS.dispatcher_port) == (
        f"{DEFAULTS.dispatcher_host}:{DEFAULTS.dispatcher_port}"
    )


def test_dispatcher_upstreams_parse_as_settings() -> None:
    env = COMPOSE["services"]["dispatcher"]["environment"]
    import json

    upstreams = Settings(upstreams=json.loads(env["TOLLGATE_UPSTREAMS"])).effective_upstreams
    assert upstreams[0].base_url == "http://simulator:8701/v1"
    assert set(upstreams[0].models) == set(DEFAULTS.effective_upstreams[0].models)


def test_kafka_is_kraft_and_advertises_the_default_bootstrap() -> None:
    env = COMPOSE["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert f"PLAINTEXT://{DEFAULTS.kafka_bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert COMPOSE["services"]["kafka"]["image"].startswith("apache/kafka:")


def test_tollgate_services_use_known_settings() -> None:
    known = {row for row in Settings.model_fields}
    for name, service in COMPOSE["services"].items():
        if service.get("build") != ".":
            continue
        env = service.get("environment", {})
        for key in env:
            assert key.startswith("TOLLGATE_"), f"{name}: {key}"
            assert key.removeprefix("TOLLGATE_").lower() in known, f"{name}: unknown setting {key}"
        assert env["TOLLGATE_KAFKA_BOOTSTRAP"].split(":")[0] == "kafka"
        assert env["TOLLGATE_CLICKHOUSE_URL"].startswith("http://")


def test_grafana_datasource_points_at_compose_clickhouse() -> None:
    ds = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )["datasources"][0]
    assert ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"]["host"] == "clickhouse"
    assert _host_port("clickhouse", ds["jsonData"]["port"]).endswith("8123")


def test_network_listeners_run_with_generated_keys_and_a_shared_internal_token(
    tmp_path: Path,
) -> None:
    """Dispatcher and sink listen on every interface of the compose network: they need the keys
    file and the internal token that the `secrets` service generates into a shared volume."""
    from app.http.security import check_exposure, init_secrets, internal_token

    services = COMPOSE["services"]
    secrets_dir = services["secrets"]["command"][-1]
    assert services["secrets"]["command"][:2] == ["secrets", "init"]
    generated = tmp_path / "secrets"
    init_secrets(generated)  # what the service does, into a scratch directory
    tokens = set()
    for name in ("dispatcher", "sink"):
        service = services[name]
        env = service["environment"]
        assert env["TOLLGATE_KEYS_FILE"] == f"{secrets_dir}/keys.yaml", name
        assert env["TOLLGATE_INTERNAL_TOKEN_FILE"] == f"{secrets_dir}/internal-token", name
        assert any(str(v).startswith(f"tollgate-secrets:{secrets_dir}") for v in service["volumes"])
        assert service["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
        local = {
            k.removeprefix("TOLLGATE_").lower(): str(v).replace(secrets_dir, str(generated))
            for k, v in env.items()
            if k
            in ("TOLLGATE_KEYS_FILE", "TOLLGATE_INTERNAL_TOKEN_FILE", "TOLLGATE_DISPATCHER_HOST")
        }
        settings = Settings(**local)
        check_exposure(settings)  # 0.0.0.0 with keys: allowed
        tokens.add(internal_token(settings))
    assert len(tokens) == 1, "the dispatcher sends the token the sink expects"
    assert "tollgate-secrets" in COMPOSE["volumes"]
    assert "/var/lib/tollgate-secrets" in (REPO / "Dockerfile").read_text()
