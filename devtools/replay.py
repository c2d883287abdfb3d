"""``tollgate replay FILE``: feed a usage trace through the real pipeline.

Owns turning a trace's calls (``devtools.trace``) into priced ``Usage`` events on the
usage topic, fast (large batches, ``acks=all``, idempotent producer) or at the
pace of their timestamps, and the totals a user checks the dashboard against.
Everything downstream (spend worker, anomaly agent, ClickHouse sink) sees the
events exactly as it sees the gateway's. Pricing is ``app.metering.usage``'s, so a
replayed call costs what the same call through the gateway would.

Replayed events are ``source="external"`` (the schema's value for usage reported
by others) and carry ``metadata["replay"] = <file name>``, so they can be told
apart, and deleted, in the warehouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn

import click
from aiokafka.errors import KafkaConnectionError, KafkaError

from app.anomaly_config import DetectorSettings
from app.events import clients
from app.events.codec import EventCodec, build_codec
from app.events.producer import send_now, usage_message
from app.events.topics import TopicsError, ensure_topics
from app.metering.attribution import Identity
from app.metering.usage import build_usage_record, new_id, reported_event_id
from app.pricing.catalog import PriceCatalog, nanos_to_usd
from app.settings import Settings
from devtools.trace import (
    ECONOMY_SHARE,
    Attribution,
    PlacedTrace,
    TraceCall,
    TraceFormatError,
    detect_format,
    read_trace,
)

log = logging.getLogger(__name__)

Pace = Literal["asap", "realtime"]
#: Event times may run this far ahead of the clock (the Usage ingest allows 5 minutes).
FUTURE_TOLERANCE = timedelta(seconds=5)
#: Events priced, encoded and handed to the producer before waiting for their acks.
BATCH_EVENTS = 5000
PRODUCER_BATCH_BYTES = 512 * 1024
MAX_INT32 = 2**31 - 1


class ReplayError(RuntimeError):
    """A replay that cannot run or finish; the message says what to do."""


@dataclass
class ReplayStats:
    """Totals of the events Kafka acknowledged (or, in a dry run, would have been sent)."""

    calls: int = 0
    cost_usd_nanos: int = 0
    baseline_cost_usd_nanos: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_unknown: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    seconds: float = 0.0  # producing, from the first event priced to the last acknowledged
    user_ids: set[str] = field(default_factory=set)

    def add(self, record: Mapping[str, Any]) -> None:
        self.calls += 1
        self.cost_usd_nanos += record["cost_usd_nanos"]
        self.baseline_cost_usd_nanos += record["baseline_cost_usd_nanos"]
        self.prompt_tokens += record["prompt_tokens"]
        self.completion_tokens += record["completion_tokens"]
        self.price_unknown += bool(record["price_unknown"])
        ts: datetime = record["ts"]
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        self.user_ids.add(record["user_id"])

    @property
    def events_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def usage_record(
    prices: PriceCatalog, call: TraceCall, metadata: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The priced ``Usage`` record of one attributed call (see ``devtools.trace.Attribution``)."""
    if not call.user_id or not call.model:
        raise ValueError("the call has no user or model; run it through Attribution first")
    return build_usage_record(
        prices,
        Identity(call.user_id, call.session_id, call.feature, call.team),
        request_id=call.request_id or new_id("replay_"),
        # A record naming its request id counts once, as it does through POST /v1/usage.
        **(
            {"event_id": reported_event_id(call.user_id, call.request_id)}
            if call.request_id
            else {}
        ),
        model=call.model,
        prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens,
        cached_tokens=call.cached_tokens,
        provider=call.provider,
        model_requested=call.model_requested,
        cache_hit=call.cache_hit,
        source="external",
        ts=call.ts,
        latency_ms=min(call.latency_ms, MAX_INT32),
        status=call.status,
        metadata={**call.metadata, **(metadata or {})},
    )


async def _due_batches(
    calls: Iterable[TraceCall], pace: Pace, batch_events: int
) -> AsyncIterator[list[TraceCall]]:
    """Calls in batches; ``realtime`` holds each call back until its event time has come."""
    batch: list[TraceCall] = []
    now = datetime.now(UTC)
    for call in calls:
        if call.ts > now:
            now = datetime.now(UTC)
        if pace == "realtime" and call.ts > now:
            if batch:
                yield batch
                batch = []
            await asyncio.sleep((call.ts - now).total_seconds())
            now = datetime.now(UTC)
        elif call.ts > now + FUTURE_TOLERANCE:
            raise ReplayError(
                f"a call at {call.ts.isoformat()} is in the future; place the trace earlier "
                "(an earlier --start, or none) or use --pace realtime"
            )
        batch.append(call)
        if len(batch) >= batch_events:
            yield batch
            batch = []
    if batch:
        yield batch


def _unreachable(settings: Settings) -> ReplayError:
    return ReplayError(
        f"Kafka is unreachable at {settings.kafka_bootstrap}; start it with `make up` or "
        "`tollgate kafka start`, or point TOLLGATE_KAFKA_BOOTSTRAP at your broker"
    )


async def replay_calls(
    settings: Settings,
    calls: Iterable[TraceCall],
    *,
    progress: Callable[[int], object] | None = None,
    pace: Pace = "asap",
    metadata: Mapping[str, str] | None = None,
    dry_run: bool = False,
    prices: PriceCatalog | None = None,
    codec: EventCodec | None = None,
    batch_events: int = BATCH_EVENTS,
) -> ReplayStats:
    """Price attributed, placed calls and produce them to the usage topic, keyed by user.

    ``progress(n)`` is called as each batch of ``n`` events is acknowledged. With
    ``dry_run`` nothing is sent and Kafka is not contacted. Raises ``ReplayError``
    when Kafka is unreachable or does not acknowledge, or (pace ``asap``) when a
    call lies in the future.
    """
    prices = prices or PriceCatalog(settings.baseline_model, settings.price_overrides_file)
    stats = ReplayStats()
    if dry_run:  # no pacing and no clock check: nothing is sent
        started = time.perf_counter()
        for done, call in enumerate(calls, start=1):
            stats.add(usage_record(prices, call, metadata))
            if progress and done % batch_events == 0:
                progress(batch_events)
        if progress and stats.calls % batch_events:
            progress(stats.calls % batch_events)
        stats.seconds = time.perf_counter() - started
        return stats

    codec = codec or build_codec(settings.schema_registry_url)
    try:
        report = await ensure_topics(settings)
    except (TopicsError, KafkaError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, TopicsError) else exc
        if isinstance(cause, KafkaConnectionError | OSError):
            raise _unreachable(settings) from None
        raise ReplayError(str(exc)) from None
    if report.problems:  # e.g. fewer partitions than configured: still usable for a replay
        log.warning("topics differ from what Tollgate expects", extra={"problems": report.problems})

    producer = clients.producer(
        settings,
        purpose="replay",
        linger_ms=5,  # thousands of sends per batch: fill large Kafka batches
        max_batch_size=PRODUCER_BATCH_BYTES,
    )
    try:
        await producer.start()
    except KafkaError:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise _unreachable(settings) from None

    # asap: one batch in flight while the next is priced and encoded, so the broker never idles.
    in_flight: tuple[list[dict[str, Any]], list[asyncio.Future[Any]]] | None = None

    def not_acknowledged(exc: KafkaError) -> ReplayError:
        return ReplayError(
            f"Kafka at {settings.kafka_bootstrap} did not take the replay ({exc!r}); "
            f"{stats.calls} events were acknowledged before; is the broker up "
            "(`tollgate kafka status`)?"
        )

    async def settle(records: list[dict[str, Any]], acks: list[asyncio.Future[Any]]) -> None:
        try:
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise not_acknowledged(exc) from None
        for record in records:
            stats.add(record)
        if progress:
            progress(len(records))

    started = time.perf_counter()
    try:
        async for batch in _due_batches(calls, pace, batch_events):
            records, acks = [], []
            for call in batch:
                record = usage_record(prices, call, metadata)
                try:
                    acks.append(await send_now(producer, usage_message(settings, codec, record)))
                except KafkaError as exc:
                    raise not_acknowledged(exc) from None
                records.append(record)
            if in_flight:
                await settle(*in_flight)
            in_flight = (records, acks)
            if pace == "realtime":  # report each call as it lands, not when the next one is due
                await settle(*in_flight)
                in_flight = None
        if in_flight:
            await settle(*in_flight)
        stats.seconds = time.perf_counter() - started
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), timeout=30)
    return stats


# -- the command ---------------------------------------------------------------------------
def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    from pydantic import ValidationError

    from app.logs import configure_logging

    try:
        settings = Settings()
    except (ValidationError, FileNotFoundError) as exc:
        _fail(f"invalid settings: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _parse_start(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--start {text!r}: use ISO 8601, e.g. 2025-03-01T09:00:00Z")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _own_times(path: Path) -> bool:
    """Whether the file is usage history (JSON Lines of /v1/usage records, each with its
    ``ts``), replayed at its own times unless ``--start`` moves it: last month's spend
    replayed as today's landed in today's budgets and reports (probe J)."""
    try:
        return detect_format(path) == "jsonl"
    except (TraceFormatError, OSError):
        return False


def replay_key(path: Path, seed: int, users: int, economy_share: float) -> str:
    """What makes two replays the same: the file's bytes and the draws that attribute it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{digest.hexdigest()}|{seed}|{users}|{economy_share!r}"


def with_replay_ids(calls: Iterable[TraceCall], key: str) -> Iterator[TraceCall]:
    """Each call with a request id of its own derived from ``key``, its place in the replay
    and its event time, unless its record named one: the same trace replayed again at the
    same times (a re-run, a run resumed after Ctrl-C) is the same events, which every
    consumer counts once. Fresh ids counted it twice (session 17's probe); a replay placed
    at other times (another --start, or the default: ending now) is new traffic."""
    for index, call in enumerate(calls):
        if call.request_id:
            yield call
            continue
        seed = f"{key}|{index}|{call.ts.isoformat()}".encode()
        yield replace(call, request_id="replay_" + hashlib.sha256(seed).hexdigest()[:32])


def _load(path: Path, *, seed: int, users: int, economy_share: float) -> list[TraceCall]:
    try:
        calls = list(
            Attribution(seed=seed, users=users, economy_share=economy_share)(read_trace(path))
        )
    except TraceFormatError as exc:
        _fail(str(exc))
    except IsADirectoryError:
        _fail(f"{path} is a directory; give a trace file (Azure CSV or JSON Lines)")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    if not calls:
        _fail(f"{path} has no calls to replay")
    return calls


def _place(
    calls: list[TraceCall],
    start: str | None,
    speed: float,
    repeat: int,
    pace: Pace,
    own_times: bool = False,
) -> PlacedTrace:
    """The trace on the clock. Without ``--start``: usage records (``own_times``) at their
    own times, any other trace ending now (realtime: starting now), its start on a whole
    second, so that the ``--start`` printed places it again exactly (a start with a
    fraction of a second printed without it gave a resumed run new event ids: probe J)."""
    now = datetime.now(UTC)
    if start is None and own_times:
        placed = PlacedTrace(
            calls, start=min(call.ts for call in calls), speed=speed, repeat=repeat
        )
        if placed.end > now + FUTURE_TOLERANCE and pace == "asap":
            _fail(
                f"the records' own times end at {placed.end.isoformat()}, in the future; give "
                "--start, or use --pace realtime"
            )
        return placed
    if start is None:
        if pace == "realtime":  # play forward from now, each call when its time comes
            return PlacedTrace(calls, start=now.replace(microsecond=0), speed=speed, repeat=repeat)
        ending = PlacedTrace.ending_at(calls, now, speed=speed, repeat=repeat)
        whole = ending.start.replace(microsecond=0)
        return PlacedTrace(calls, start=whole, speed=speed, repeat=repeat)
    first = _parse_start(start)
    if first > now + FUTURE_TOLERANCE:
        _fail(f"--start {start} is in the future; events are never produced ahead of the clock")
    placed = PlacedTrace(calls, start=first, speed=speed, repeat=repeat)
    if pace == "asap" and placed.end > now + FUTURE_TOLERANCE:
        _fail(
            f"from --start {start} the trace would end at {placed.end.isoformat()}, in the "
            "future; give an earlier --start, a higher --speed, or --pace realtime"
        )
    return placed


def _start_text(start: datetime) -> str:
    """``start`` as ``--start`` takes it, exactly (to the microsecond when it has any)."""
    text = start.astimezone(UTC).isoformat(
        timespec="microseconds" if start.microsecond else "seconds"
    )
    return text.replace("+00:00", "Z")


def _anomaly_clock(settings: Settings) -> datetime | None:
    """The event time the running anomaly agent's models have reached (its ``/metrics``), or
    None when no agent answers there within a second."""
    if not settings.anomaly_metrics_port:
        return None
    url = f"http://{settings.agents_metrics_host}:{settings.anomaly_metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            text = response.read(1_000_000).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "tollgate_anomaly_watermark_timestamp_seconds":
            try:
                return datetime.fromtimestamp(float(value), UTC)
            except (ValueError, OverflowError, OSError):
                return None
    return None


def _late_note(settings: Settings, placed: PlacedTrace) -> str | None:
    """What to say when the anomaly agent has seen later traffic than the replay: those
    records count everywhere but are not judged by the request-rate detectors (session
    13's probe replayed a loop after live traffic; 3,756 of 3,767 records were late)."""
    clock = _anomaly_clock(settings)
    if clock is None or placed.start >= clock:
        return None
    behind = clock - timedelta(seconds=DetectorSettings().allowed_lateness_seconds)
    late = sum(1 for call in placed if call.ts < behind)
    if not late:
        return None
    return (
        f"note: the anomaly agent has seen traffic up to {clock.isoformat(timespec='seconds')};"
        f" {late:,} of {len(placed):,} calls of this replay are older. They count for spend, "
        "budgets, reports and the cost models, but the request-rate detectors do not judge "
        "them (its tollgate_anomaly_late_records). To have every detector judge a trace, "
        "replay it into an anomaly agent that has seen nothing later (a fresh stack), or "
        "use --pace realtime, which stamps each call as it is sent."
    )


def _usd(nanos: int) -> str:
    return f"${nanos_to_usd(nanos):,.9f}"


def _print_totals(
    stats: ReplayStats, placed: PlacedTrace, name: str, topic: str, dry: bool
) -> None:
    verb = "would replay" if dry else "replayed"
    first = stats.first_ts.isoformat(timespec="seconds") if stats.first_ts else "-"
    last = stats.last_ts.isoformat(timespec="seconds") if stats.last_ts else "-"
    click.echo(f"{verb:<10} {stats.calls:,} calls from {name} (x{placed.repeat})")
    click.echo(f"{'window':<10} {first} .. {last}")
    click.echo(f"{'cost':<10} {_usd(stats.cost_usd_nanos)}")
    click.echo(f"{'baseline':<10} {_usd(stats.baseline_cost_usd_nanos)}")
    click.echo(
        f"{'tokens':<10} {stats.prompt_tokens:,} in, {stats.completion_tokens:,} out; "
        f"{len(stats.user_ids):,} users; {stats.price_unknown:,} calls without a price"
    )
    if dry:
        click.echo("dry run: nothing was produced")
    else:
        click.echo(
            f"{'produced':<10} {stats.calls:,} events to {topic} in {stats.seconds:.2f} s "
            f"({stats.events_per_s:,.0f} events/s); rows carry metadata replay={name}"
        )


@click.command("replay")
@click.argument("trace_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option(
    "--start",
    default=None,
    help=(
        "ISO time of the first call. Default: /v1/usage records (JSON Lines) at their own "
        "times; any other trace ends now (realtime: starts now), on a whole second."
    ),
)
@click.option(
    "--speed",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Divide the gaps between calls by this (60 = an hour in a minute).",
)
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Play the trace N times back to back.",
)
@click.option(
    "--pace",
    default="asap",
    show_default=True,
    type=click.Choice(["asap", "realtime"]),
    help="asap: as fast as Kafka takes them; realtime: each call when its time comes.",
)
@click.option(
    "--seed",
    default=7,
    show_default=True,
    help="Seed of the user/feature/model draw for rows that have none.",
)
@click.option(
    "--users",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Users to draw from (Zipf: a few heavy users, a long tail).",
)
@click.option(
    "--economy-share",
    default=ECONOMY_SHARE,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of drawn models from the economy tier.",
)
@click.option(
    "--dry-run", is_flag=True, help="Price the calls and print the totals; produce nothing."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def replay_command(
    trace_file: Path,
    start: str | None,
    speed: float,
    repeat: int,
    pace: Pace,
    seed: int,
    users: int,
    economy_share: float,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Replay a usage trace through Kafka, the agents and ClickHouse, priced like live traffic.

    FILE is the Azure LLM inference trace CSV (e.g. data/AzureLLMInferenceTrace_conv.csv),
    a BurstGPT CSV (ChatGPT and GPT-4 priced as gpt-3.5-turbo and gpt-4), a Mooncake trace
    (JSON Lines of timestamp, input_length, output_length), or JSON Lines of /v1/usage records
    (ts, user_id, feature, model, prompt_tokens, ...). Rows without a user, session, feature
    or model get a seeded draw.
    """
    from tqdm import tqdm

    settings = _settings()
    calls = _load(trace_file, seed=seed, users=users, economy_share=economy_share)
    own_times = _own_times(trace_file)
    placed = _place(calls, start, speed, repeat, pace, own_times)
    topic = settings.topic("usage")
    again = f"to re-run or resume it without counting anything twice: --start {_start_text(placed.start)}"
    if not quiet:
        where = "(dry run)" if dry_run else f"into {topic} at {settings.kafka_bootstrap}"
        placement = " (the records' own times)" if own_times and start is None else ""
        click.echo(
            f"replaying {len(placed):,} calls, {_start_text(placed.start)} .. "
            f"{placed.end.isoformat(timespec='seconds')}{placement}, {pace} {where}; {again}",
            err=True,
        )
    # Asked before the replay moves it: the agent's clock says what of the trace is history.
    late_note = _late_note(settings, placed)
    try:
        prices = PriceCatalog(settings.baseline_model, settings.price_overrides_file)
    except ValueError as exc:
        _fail(str(exc))
    # delay: no bar flashes up for a replay that fails at once or is over in a blink.
    bar = tqdm(
        total=len(placed), unit="ev", unit_scale=True, file=sys.stderr, disable=quiet, delay=0.5
    )
    with bar:
        try:
            stats = asyncio.run(
                replay_calls(
                    settings,
                    with_replay_ids(placed, replay_key(trace_file, seed, users, economy_share)),
                    progress=bar.update,
                    pace=pace,
                    metadata={"replay": trace_file.name},
                    dry_run=dry_run,
                    prices=prices,
                )
            )
        except ReplayError as exc:
            bar.close()
            _fail(str(exc))
        except KeyboardInterrupt:
            bar.close()
            _fail(f"interrupted; the events acknowledged so far stay in Kafka; {again}", code=130)
    _print_totals(stats, placed, trace_file.name, topic, dry_run)
    if late_note:
        click.echo(late_note, err=True)
