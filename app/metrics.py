"""Prometheus metrics of one dispatcher (its own registry, no module-level state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


# Model names a client may make up (a `/v1/usage` record's model is free text) get a label of
# their own up to this many; the rest share OTHER_MODEL.
MAX_FREE_MODEL_LABELS = 100
OTHER_MODEL = "(other)"


class ModelLabels:
    """The ``model`` label of a call's metrics, with a bounded number of values.

    A model an upstream lists is always its own label; so are the first
    :data:`MAX_FREE_MODEL_LABELS` other names seen; any later one is :data:`OTHER_MODEL`.
    Every name a client sent was its own label before, and one POST of 1,000 made-up names
    added 8,000 series to /metrics for good (session 17's probe)."""

    def __init__(self, listed: frozenset[str], limit: int = MAX_FREE_MODEL_LABELS) -> None:
        self._listed = listed
        self._limit = limit
        self._free: set[str] = set()

    def __call__(self, model: str) -> str:
        if model in self._free or model in self._listed:
            return model
        if len(self._free) < self._limit:
            self._free.add(model)
            return model
        return OTHER_MODEL


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tollgate_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "tollgate_request_duration_seconds",
            "HTTP request latency by route (streams: until the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "tollgate_upstream_duration_seconds",
            "Upstream call duration by upstream: request sent to last byte, streams included",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttft = Histogram(
            "tollgate_upstream_ttft_seconds",
            "Time to the first content token of streamed calls, by upstream",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.budget_swept = Counter(
            "tollgate_budget_reservations_swept",
            "Reservations released by the sweep after max_call_duration_s (a call path failed "
            "to release its own: a bug to report)",
            registry=r,
        )
        self.budget_capped = Counter(
            "tollgate_budget_output_capped",
            "Calls whose max_tokens the budget gate lowered to keep a cap's worst case",
            registry=r,
        )
        self.budget_downgraded = Counter(
            "tollgate_budget_routed_down",
            "model 'auto' calls the budget gate refused on the routed tier, retried on the next "
            "cheaper tier with a model (by the tier tried): X-Tollgate-Budget-Downgraded-From",
            ["tier"],
            registry=r,
        )
        self.cache_results = Counter(
            "tollgate_cache_results",
            "Chat answers by response-cache result (hit, miss, bypass): X-Tollgate-Cache",
            ["result"],
            registry=r,
        )
        self.routed = Counter(
            "tollgate_routed_calls",
            "Answered routed calls by the tier that served them and whether they were escalated",
            ["tier", "escalated"],
            registry=r,
        )
        self.router_score = Histogram(
            "tollgate_router_score",
            "The router's score (its estimate that the economy tier would fail) of each scored "
            "request, by the tier it chose: how close calls sit to routing.quality_target",
            ["tier"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.routing_failures = Counter(
            "tollgate_routing_failures",
            "Failed attempts of routed calls by their tier, the failure (upstream_error, timeout; "
            "empty, truncated, refused as judged by the validators, which a stream runs only "
            "while it may still escalate) and what followed: escalated one tier up, or answered "
            "as it was (top tier, second attempt, escalation off, budget)",
            ["from_tier", "reason", "result"],
            registry=r,
        )
        self.routing_explored = Counter(
            "tollgate_routing_explored",
            "Upstream calls the router sent to the economy tier by exploration (against its "
            "advice, to learn: routing.exploration_rate), by call status (ok, error, "
            "client_disconnected); their Usage events say explored=true",
            ["status"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tollgate_upstream_errors",
            "Upstream failures by upstream and kind (connect, timeout, http_4xx, http_5xx)",
            ["upstream", "kind"],
            registry=r,
        )
        self.spend = Counter(
            "tollgate_spend_usd", "Spend in USD by served model", ["model"], registry=r
        )
        self.baseline_spend = Counter(
            "tollgate_baseline_spend_usd",
            "Baseline-model cost in USD by served model, of priced requests (as the reports)",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "tollgate_tokens",
            "Tokens by model and kind (prompt, completion, cached)",
            ["model", "kind"],
            registry=r,
        )
        self.price_unknown = Counter(
            "tollgate_price_unknown_usage",
            "Usage events of models with no known price (cost not counted!)",
            ["model"],
            registry=r,
        )
        self.events_delivered = Counter(
            "tollgate_events_delivered", "Events acknowledged by Kafka", registry=r
        )
        self.spool_depth = Gauge(
            "tollgate_spool_depth",
            "Events spooled on disk, not yet acknowledged by Kafka",
            registry=r,
        )
        self.spool_bytes = Gauge(
            "tollgate_spool_bytes", "Bytes of undelivered events on disk", registry=r
        )
        self.kafka_connected = Gauge(
            "tollgate_kafka_connected",
            "1 when the event producer is connected to Kafka",
            registry=r,
        )

    def bind_spool(self, depth: Callable[[], float], size: Callable[[], float]) -> None:
        self.spool_depth.set_function(depth)
        self.spool_bytes.set_function(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
