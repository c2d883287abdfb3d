"""The ``/metrics`` listener of an agent process (anomaly agent, router learner, notifier).

The dispatcher serves ``/metrics`` on its own port; the agents serve no API, so each gets a
small listener of its own (``GET /metrics`` in Prometheus text format, ``GET /healthz``),
bound to ``Settings.agents_metrics_host`` and the agent's port setting (0: no listener).

The listener lives for the whole process, outside the agent's retry-while-Kafka-is-down
loop: an agent that cannot reach Kafka still answers, and says so in its metrics. A port
that cannot be bound (another process holds it) is logged as an error and the agent runs
on without metrics: losing the scrape must not stop learning or paging.

Agents whose figures are attributes of an object they rebuild on every Kafka retry expose
them through :class:`Following`, which keeps this process's counters monotonic across the
rebuilds (the previous object's totals are carried over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.events.kafka_retry import retry_while_kafka_down
from app.http.runner import JsonErrorsRunner, quiet_unparsable_requests

log = logging.getLogger(__name__)

T = TypeVar("T")


def create_metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


@contextlib.asynccontextmanager
async def metrics_listener(
    registry: CollectorRegistry, host: str, port: int, *, name: str
) -> AsyncIterator[int | None]:
    """Serve ``registry`` on ``host:port`` for the duration of the block; yields the bound
    port, or None when ``port`` is 0 or cannot be bound (logged)."""
    if not port:
        yield None
        return
    # The dispatcher's runner: what aiohttp's parser rejects is answered in JSON here too
    quiet_unparsable_requests()
    runner = JsonErrorsRunner(create_metrics_app(registry), access_log=None)
    await runner.setup()
    bound: int | None = None
    try:
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = port
            log.info(f"{name} metrics on http://{host}:{port}/metrics")
        except OSError as exc:
            log.error(
                f"{name}: cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                "running without them (set its metrics port to a free one, or 0)",
                extra={"host": host, "port": port},
            )
        yield bound
    finally:
        await runner.cleanup()


class Following(Generic[T]):
    """The agent object of the current attempt, and this process's totals of the counters
    of the attempts before it (``counters(obj)`` reads an object's counters by name)."""

    def __init__(self, counters: Callable[[T], dict[str, float]]) -> None:
        self._counters = counters
        self.current: T | None = None
        self._carried: dict[str, float] = {}

    def follow(self, obj: T) -> T:
        if self.current is not None:
            for name, value in self._counters(self.current).items():
                self._carried[name] = self._carried.get(name, 0.0) + value
        self.current = obj
        return obj

    def total(self, name: str) -> float:
        now = self._counters(self.current).get(name, 0.0) if self.current is not None else 0.0
        return self._carried.get(name, 0.0) + now


def stop_on_signals(stop: asyncio.Event) -> list[signal.Signals]:
    """Set ``stop`` on SIGINT and SIGTERM; returns the signals handled (none off the main
    thread or on Windows, where Ctrl-C cancels instead)."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    return handled


class _Runs(Protocol):
    def run(self, stop: asyncio.Event) -> Awaitable[None]: ...


R = TypeVar("R", bound=_Runs)


async def run_following(
    make: Callable[[], R],
    counters: Callable[[R], dict[str, float]],
    families: Callable[[Following[R]], Iterable[Metric]],
    *,
    host: str,
    port: int,
    name: str,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run an agent process: ``make()`` a fresh agent and run it until ``stop`` is set (or
    SIGINT/SIGTERM), again after each time Kafka was down, serving ``families`` of the
    agents followed so far on ``host:port`` meanwhile."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    registry = registry or CollectorRegistry()
    following: Following[R] = Following(counters)
    registry.register(FamilyCollector(lambda: families(following)))
    async with metrics_listener(registry, host, port, name=name):
        await retry_while_kafka_down(lambda: following.follow(make()).run(stop), name, stop)


class FamilyCollector(Collector):
    """A collector whose ``families()`` builds the metric families at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled_gauge(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def labelled_counter(
    name: str, doc: str, label: str, values: dict[str, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
