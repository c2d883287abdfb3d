"""Tollgate's one typed settings object.

Owns every configurable value and its default. Values come, in order of
precedence, from ``TOLLGATE_*`` environment variables, then an optional YAML
file (path in ``TOLLGATE_CONFIG``), then the defaults below. Nothing else in
the code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from app.alerts_config import parse_alert_targets
from app.anomaly_config import DetectorSettings
from app.cache.config import CacheSettings
from app.routing.config import RoutingSettings

CONFIG_ENV_VAR = "TOLLGATE_CONFIG"
SIMULATOR_MODELS = (
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "gpt-3.5-turbo",
    "tollgate-sim-unpriced",
)


class UpstreamConfig(BaseModel):
    """One OpenAI-compatible provider. The API key is read from ``api_key_env`` at start-up."""

    model_config = {"frozen": True}

    name: str = Field(min_length=1)
    base_url: str = Field(description="Base URL including /v1, e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(default=None, description="Env var holding the API key.")
    models: tuple[str, ...] = Field(min_length=1, description="Models served; '*' = any.")
    price_provider: str | None = Field(
        default="openai", description="genai-prices provider id used to price its models."
    )
    forward_headers: tuple[str, ...] = Field(
        default=("OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta"),
        description="Client headers passed to this upstream (case-insensitive globs).",
    )
    prompt_counter: Literal["openai", "simulator"] | None = Field(
        default=None,
        description=(
            "How this upstream counts prompt tokens, for the room a call under a cap is "
            "reserved and refused on: 'openai' (its model's OpenAI tokenizer, o200k or "
            "cl100k), 'simulator' (the bundled simulator's rule). Unset: either may bill, "
            "so a reservation covers the larger count and a prompt is refused on its own "
            "cost only past the lesser."
        ),
    )


class Settings(BaseSettings):
    """All of Tollgate's configuration. Field ``foo`` is env var ``TOLLGATE_FOO``."""

    model_config = SettingsConfigDict(
        env_prefix="TOLLGATE_",
        extra="ignore",
        frozen=True,
        # Validation errors must not echo values: webhook URLs and keys are secrets.
        hide_input_in_errors=True,
    )

    # -- local state -------------------------------------------------------------
    state_dir: Path = Field(
        default=Path(".tollgate"),
        description="Local state: chdb directory, spool, Kafka data and logs.",
    )

    # -- Kafka ---------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092",
        description="Kafka bootstrap servers. `make up` starts a local broker when this is "
        "the default and nothing listens there.",
    )
    kafka_controller_port: int = Field(
        default=9093, description="KRaft controller port of the local broker."
    )
    kafka_version: str = Field(
        default="4.1.1", description="Apache Kafka version the local launcher fetches."
    )
    kafka_cache_dir: Path = Field(
        default=Path("~/.cache/tollgate"),
        description="Where the local launcher keeps Kafka jars (outside the repo).",
    )
    kafka_heap_opts: str = Field(
        default="-Xms512m -Xmx1g", description="JVM heap of the local broker."
    )
    kafka_start_timeout_s: float = Field(
        default=120.0, description="How long the local launcher waits for readiness."
    )
    topic_prefix: str = Field(default="tollgate", description="Prefix of every topic name.")
    topic_partitions: int = Field(
        default=6, ge=1, description="Partitions of the high-volume topics (usage, requests)."
    )
    topic_replication: int = Field(default=1, ge=1, description="Replication factor of topics.")
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent Schema Registry URL; unset = fixed schema ids from schemas/.",
    )

    # -- ClickHouse ----------------------------------------------------------------
    clickhouse_url: str | None = Field(
        default=None,
        description="`http://host:8123` for a server; unset = embedded chdb under state_dir.",
    )

    # -- HTTP services -----------------------------------------------------------
    dispatcher_host: str = Field(default="127.0.0.1", description="Dispatcher bind address.")
    dispatcher_port: int = Field(default=8700, description="Dispatcher port.")
    reports_host: str = Field(default="127.0.0.1", description="Reports server (in the sink).")
    reports_port: int = Field(default=8702, description="Reports server port.")
    simulator_host: str = Field(default="127.0.0.1", description="Upstream simulator address.")
    simulator_port: int = Field(default=8701, description="Upstream simulator port.")
    agents_metrics_host: str = Field(
        default="127.0.0.1",
        description="Address of the agents' own `/metrics` listeners (anomaly agent, router "
        "learner, notifier).",
    )
    anomaly_metrics_port: int = Field(
        default=8703, ge=0, le=65535, description="`tollgate anomaly`'s `/metrics` port (0: none)."
    )
    router_learn_metrics_port: int = Field(
        default=8704,
        ge=0,
        le=65535,
        description="`tollgate router-learn`'s `/metrics` port (0: none).",
    )
    notifier_metrics_port: int = Field(
        default=8705, ge=0, le=65535, description="`tollgate notify`'s `/metrics` port (0: none)."
    )

    # -- dispatcher ------------------------------------------------------------
    upstreams: tuple[UpstreamConfig, ...] = Field(
        default=(),
        description="Providers as a JSON/YAML list of {name, base_url, api_key_env, models}; "
        "unset = the bundled simulator at TOLLGATE_SIMULATOR_HOST:PORT.",
    )
    default_model: str = Field(
        default="gpt-4o-mini", description="Model for /v1/dispatch requests that name none."
    )
    baseline_model: str = Field(
        default="gpt-4", description="Model whose rates give every event its baseline cost."
    )
    price_overrides_file: Path | None = Field(
        default=None,
        description="YAML of negotiated or missing prices (see app/pricing/catalog.py).",
    )
    keys_file: Path | None = Field(
        default=None,
        description="YAML of API keys (sha256 -> user, team, features); set = keys required.",
    )
    require_attribution: Literal["none", "user", "user_and_feature"] = Field(
        default="none",
        description="What a request must carry: `none` attributes it to `anonymous`.",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Request body cap.")
    body_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for a request body to arrive whole; then a 408 (a client that "
        "declares a length and sends less held its connection open forever).",
    )
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0, description="Connect timeout.")
    upstream_read_timeout_s: float = Field(
        default=120.0, gt=0, description="Max silence from an upstream before 504."
    )
    spool_max_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="Disk cap of undelivered events (spool)."
    )
    spool_fsync: Literal["always", "batch", "never"] = Field(
        default="batch", description="Spool durability: see app/events/spool.py."
    )

    usage_max_lateness_s: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="How late a /v1/usage or /v1/outcomes record's `ts` may be; older = 400. "
        "A late record counts in the budget period of its own timestamp.",
    )
    usage_max_clock_skew_s: float = Field(
        default=300.0,
        ge=0,
        description="How far ahead of the dispatcher's clock a reported `ts` may be.",
    )

    # -- security -----------------------------------------------------------------
    internal_token: SecretStr | None = Field(
        default=None,
        description="Shared secret the dispatcher sends to internal listeners (the sink's "
        "reports server), which refuse requests without it or an admin key. Unset: "
        "TOLLGATE_INTERNAL_TOKEN_FILE.",
    )
    internal_token_file: Path | None = Field(
        default=None,
        description="File holding the internal token; unset = <state_dir>/internal-token, "
        "created (mode 0600) by the first process that needs it.",
    )
    allow_open_admin: bool = Field(
        default=False,
        description="Serve budget admin and reports without keys on a non-loopback address "
        "(refused by default: set TOLLGATE_KEYS_FILE instead).",
    )
    reports_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long the dispatcher waits for the reports server before a 503.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Admin API key the CLI sends with `--url` (budgets through the dispatcher).",
    )

    # -- budgets ----------------------------------------------------------------
    budgets_file: Path | None = Field(
        default=None,
        description="YAML of budget policies published at dispatcher start-up (see README).",
    )
    budget_fail_closed: bool = Field(
        default=False,
        description="Answer 503 instead of serving when budget decisions are stale (Kafka down).",
    )
    budget_max_staleness_s: float = Field(
        default=30.0, gt=0, description="Decision age beyond which fail-closed refuses requests."
    )
    budget_reservations: bool = Field(
        default=True,
        description="Reserve each in-flight request's worst case against caps (bounds overshoot).",
    )
    reserve_output_tokens: int = Field(
        default=512,
        ge=1,
        description="Output tokens a call is expected to produce until the dispatcher has seen "
        "20 calls of its model (then: the 95th percentile of the last 500).",
    )
    max_output_tokens: int = Field(
        default=16_384,
        ge=1,
        description="Output limit assumed for a call that sets no max_tokens (its worst case).",
    )
    budget_max_overshoot_fraction: float = Field(
        default=0.1,
        ge=0,
        description="A lone call near a cap is served with the output that is left (one token "
        "at least), crossing the cap by its prompt's cost; a call whose prompt alone would "
        "cross it by more than this share of the limit is refused with 402.",
    )
    budget_policy_change_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="After a scope's own cap appears or changes its period, time zone or "
        "window, how long its calls wait for the spend worker's count of the new period "
        "(about a second) before the gate decides on its own numbers; without the wait a "
        "blocked user read as $0 spent for that second.",
    )
    budget_queue_wait_s: float = Field(
        default=600.0,
        ge=0,
        description="Near a cap, how long a call waits for calls in flight to settle before "
        "it is refused with 402. The default is max_call_duration_s's: the calls in flight "
        "have ended by then, so a user under the cap is not refused while others finish (at "
        "30 s, 58 of 64 concurrent 35-second calls were refused at 3 % of a cap).",
    )
    start_kafka_answer_wait_s: float = Field(
        # 10 s (a Kafka request's timeout, what a start waited before): a broker slowed by a
        # busy machine that answers late is not hung, and a start that gives up on it skips
        # reading back the usage the spend worker has not counted (a review)
        default=10.0,
        gt=0,
        description="At start, how long the dispatcher waits for Kafka's first answer (the "
        "budget views and the shared router model, together) before it listens and serves "
        "from the budget view it saved before (`<state_dir>/budget-view.json`), its usage "
        "spooled; the topics are then read in the background. A refused connection does not "
        "wait; a hung broker (connections accepted, never answered) waits this long.",
    )
    start_kafka_catch_up_s: float = Field(
        default=30.0,
        gt=0,
        description="At start, once Kafka answered, how long the dispatcher waits to catch up "
        "with the budget decisions and policies and the shared router model (together) "
        "before it serves with what it has read.",
    )
    start_uncounted_read_s: float = Field(
        default=10.0,
        gt=0,
        description="How long the dispatcher reads back the usage the spend worker has not "
        "counted yet (held at the budget gate until counted): at start with Kafka answering, "
        "else once its budget views catch up.",
    )
    max_call_duration_s: float = Field(
        default=600.0,
        gt=0,
        description="Longest a call may take, streams included; it is then cut (504 or an SSE "
        "error event), its reservation released and its usage counted.",
    )
    spend_dedupe_window: int = Field(
        default=50_000,
        ge=100,
        description="Usage event ids per partition the spend worker remembers to count a re-sent "
        "event once (the dispatcher's spool re-sends after a crash or a Kafka outage).",
    )
    spend_reported_ids_max: int = Field(
        default=1_000_000,
        ge=0,
        description="Ids of reported calls (POST /v1/usage, `tollgate replay`) the spend worker "
        "remembers, in its changelog, to count a report re-sent later than the dedupe window "
        "once (a late client retry, a replay run again). Each is forgotten once no period can "
        "count its call any more (65 days); past this many, the oldest calls first (about "
        "300 bytes each in memory, 600 when reports come one at a time). 0: none (a late retry is then charged again).",
    )
    spend_stall_s: float = Field(
        default=10.0,
        gt=0,
        description="A partition the spend worker reads (usage, partial sums, requests, or a "
        "table's changelog while it recovers) that has records left but has not moved for this "
        "long, with nothing of it in flight, is fetched again from where the worker stands "
        "(its consumer can lose fetched records; nothing else would fetch them again).",
    )
    spend_views_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="The spend worker publishes no decision until it has read the budget "
        "decisions and policies topics. Past this long since it started reading them, one "
        "still unread is logged as an error; if the worker has not reached the broker for "
        "that topic for this long either, the worker crashes (exit 1) so that its supervisor "
        "restarts it and its partitions go to a worker that can decide them.",
    )
    settle_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="After a request's deadline (max_call_duration_s), how long the spend worker "
        "waits for its usage before counting an estimate (its dispatcher died).",
    )
    clock_start: datetime | None = Field(
        default=None,
        description="Testing only: start the clock at this ISO instant (period-boundary tests).",
    )

    # -- alerts -------------------------------------------------------------------
    anomaly_options: dict[str, str] = Field(
        default_factory=dict,
        description="Anomaly detection thresholds to override, as JSON, e.g. "
        '{"volume_p_value": "1e-6", "cost_min_ratio": "2"} (every name and why: docs/ANOMALY.md).',
    )
    alert_targets: tuple[dict[str, Any], ...] = Field(
        default=(),
        description="On-call webhooks for alerts: a JSON list (env) or YAML list of {name, url, "
        "format: json|slack|pagerduty|alertmanager, routing_key, min_severity, kinds}.",
    )

    # -- savings: tier router and response cache (app/routing, app/cache) -----------------
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings,
        description="Tier router: tiers per provider, per-feature rules, quality_target "
        "(JSON in the env var, or a `routing:` block in the YAML file; see docs/SAVINGS.md).",
    )
    cache: CacheSettings = Field(
        default_factory=CacheSettings,
        description="Response cache: enabled, ttl_s, max_bytes, per-feature rules (JSON in "
        "the env var, or a `cache:` block in the YAML file; see docs/SAVINGS.md).",
    )

    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="`json` one object per line; `auto` = text on a TTY."
    )
    log_level: str = Field(default="INFO", description="Python log level.")

    @field_validator("anomaly_options", mode="after")
    @classmethod
    def _check_anomaly_options(cls, value: dict[str, str]) -> dict[str, str]:
        DetectorSettings.with_options(**value)
        return value

    @field_validator("alert_targets", mode="after")
    @classmethod
    def _check_alert_targets(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        parse_alert_targets(list(value))
        return value

    @field_validator("state_dir", "kafka_cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get(CONFIG_ENV_VAR)
        if config_path:
            path = Path(config_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"{CONFIG_ENV_VAR}={config_path} does not name a readable YAML file"
                )
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        sources.append(file_secret_settings)
        return tuple(sources)

    # -- derived values ------------------------------------------------------------
    @cached_property
    def clickhouse_dsn(self) -> str:
        """The clickhouse-connect DSN: the configured server, else chdb on disk."""
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.state_dir / 'chdb').resolve()}"

    @cached_property
    def effective_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """The configured upstreams, or the bundled simulator when none is configured."""
        if self.upstreams:
            return self.upstreams
        return (
            UpstreamConfig(
                name="simulator",
                base_url=f"{self.simulator_url}/v1",
                models=SIMULATOR_MODELS,
                forward_headers=("X-Sim-*",),  # the simulator's test hooks
                prompt_counter="simulator",
            ),
        )

    @cached_property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @cached_property
    def reports_url(self) -> str:
        return f"http://{self.reports_host}:{self.reports_port}"

    @cached_property
    def dispatcher_url(self) -> str:
        return f"http://{self.dispatcher_host}:{self.dispatcher_port}"

    @cached_property
    def simulator_url(self) -> str:
        return f"http://{self.simulator_host}:{self.simulator_port}"

    def topic(self, name: str) -> str:
        """Full topic name, e.g. ``topic("usage") == "tollgate.usage"``."""
        return f"{self.topic_prefix}.{name}"


def describe_settings() -> list[dict[str, Any]]:
    """Every setting with its env var, default and description (for docs and `tollgate config`)."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default in ((), None, {}):
            default = ""
        rows.append(
            {
                "env": f"TOLLGATE_{name.upper()}",
                "default": str(default),
                "description": field.description or "",
            }
        )
    return rows
