"""What does Tollgate add to a request? Direct vs floor proxy vs the real dispatcher.

One run, one machine, the same simulator code, three configurations plus a control:

``direct``
    load generator -> upstream simulator. The ceiling.
``proxy``
    load generator -> a minimal aiohttp pass-through proxy (defined here: one pooled
    ``ClientSession``, forwards the POST body, streams the answer back with
    ``iter_any``, nothing else) -> simulator. The floor of what any Python proxy costs.
``tollgate``
    load generator -> ``tollgate serve`` (the real dispatcher, events spooled and
    shipped to a real local Kafka broker) -> simulator.
``control``
    ``direct`` again, run last in each round: its "added" latency is the measurement
    noise (an A/A test), against which the floor and Tollgate are judged.

Every server runs in its own process (simulator, proxy or dispatcher, Kafka's JVM); the
load generator (aiohttp, one task per concurrent client) runs in this process. Each
configuration gets its own simulator with the same seed, so all of them draw the same
lognormal time-to-first-token values: the differences between them are the proxy's,
not the simulator's dice (common random numbers).

Measured per run: requests/s, p50/p99 client-side latency (time to the full response;
for streams, to the last byte), errors, CPU milliseconds per request of every process,
and the dispatcher's RSS. After the Tollgate runs it checks that every event reached
Kafka (``/metrics`` and the topics' end offsets) and that the spool drained to 0.

Run ``python -m bench.gateway`` (``--quick`` for a smoke run, ``--json-out FILE`` to keep
the figures). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 64
JSON_TYPE = "application/json"
CLIENT_HEADERS = {
    "Content-Type": JSON_TYPE,
    "Authorization": "Bearer sk-bench-not-checked",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_SAMPLE_S = 0.05
TARGET_RATIO = 1.5
TARGET_RSS_MB = 150.0
CONFIGS = ("direct", "proxy", "tollgate", "control")
"""``control`` repeats ``direct`` (own simulator, same seed): its "added" latency is noise."""
QUIET_CORES = 0.25  # CPU of other processes (cores) below which the machine counts as idle


# -- workload -------------------------------------------------------------------------------
_SENTENCES = (
    "The quarterly infrastructure review found that inference spend grew faster than traffic.",
    "Most of the growth came from two features that call the largest model for every keystroke.",
    "Caching the system prompt cut input costs by a third for the support assistant.",
    "The search team routes short factual questions to a smaller model with no loss in ratings.",
    "Budgets are enforced per team, and alerts fire when a day's spend exceeds its forecast.",
    "Refund requests must include the order number, the purchase date and the reason.",
    "Orders shipped to the European Union are subject to value added tax at checkout.",
    "A paperback edition usually costs less but wears faster than a cloth-bound hardcover.",
    "The warehouse in Rotterdam handles returns for every country in the eurozone.",
    "Customers on the premium plan get free expedited shipping on orders above fifty euros.",
    "The retry policy waits two hundred milliseconds, then doubles the delay up to five seconds.",
    "Each service logs one JSON object per line, and never logs API keys or prompt text.",
    "The migration keeps the old table readable until every consumer has switched over.",
    "Latency at the ninety-ninth percentile matters more to users than the average does.",
    "A circuit breaker opens after five consecutive failures and half-opens after thirty seconds.",
    "The evaluation set holds four hundred questions with reference answers reviewed by hand.",
)


def _document(index: int, sentences: int) -> str:
    """A deterministic paragraph of ``sentences`` sentences, different for each index."""
    n = len(_SENTENCES)
    picked = [_SENTENCES[(index * 7 + k * 3) % n] for k in range(sentences)]
    return f"[doc {index}] " + " ".join(picked)


def prompts() -> list[tuple[str, list[dict[str, str]]]]:
    """Four realistic prompts of increasing size: (name, messages)."""
    short = [
        {"role": "system", "content": "You are a concise assistant for an online bookshop."},
        {
            "role": "user",
            "content": "What is the difference between a hardcover and a paperback edition, "
            "and which one lasts longer?",
        },
    ]
    chat = [
        {
            "role": "system",
            "content": "You are the customer support assistant of an online bookshop. Be "
            "polite, answer in at most three sentences, and never invent order details. "
            + _document(1, 6),
        },
        {"role": "user", "content": "Hi, I ordered two books last week and one arrived damaged."},
        {
            "role": "assistant",
            "content": "I am sorry to hear that. Could you give me the order number and tell me "
            "which of the two books was damaged?",
        },
        {"role": "user", "content": "Order 48213-B, the cloth-bound atlas. " + _document(2, 5)},
        {
            "role": "assistant",
            "content": "Thank you. I can offer a replacement or a refund; the replacement ships "
            "from Rotterdam within two working days. " + _document(3, 4),
        },
        {
            "role": "user",
            "content": "A replacement, please. Will I have to pay for shipping again?",
        },
    ]
    rag_context = "\n\n".join(_document(i, 8) for i in range(10))
    rag = [
        {
            "role": "system",
            "content": "Answer only from the context. Cite documents as [doc N]. If the "
            "context does not contain the answer, say so.",
        },
        {
            "role": "user",
            "content": f"Context:\n{rag_context}\n\nQuestion: which measures reduced "
            "inference spend, and by how much?",
        },
    ]
    long_context = "\n\n".join(_document(i, 10) for i in range(24))
    long = [
        {
            "role": "system",
            "content": "You summarise internal engineering reports for executives.",
        },
        {
            "role": "user",
            "content": f"Report:\n{long_context}\n\nSummarise the report in five bullet "
            "points, most important first.",
        },
    ]
    return [("short", short), ("chat", chat), ("rag", rag), ("long", long)]


def request_bodies(stream: bool) -> list[bytes]:
    """The encoded request bodies, one per prompt (sent round-robin)."""
    bodies = []
    for _name, messages in prompts():
        body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        bodies.append(orjson.dumps(body))
    return bodies


# -- the floor proxy (runs in its own process) ------------------------------------------------
_PROXY_SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)


def create_proxy_app(upstream: str) -> web.Application:
    """A minimal pass-through proxy: POST body in, upstream bytes out, nothing else."""
    app = web.Application(client_max_size=4 * 1024 * 1024)
    upstream = upstream.rstrip("/")
    forward_headers = {"Content-Type": JSON_TYPE}

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=120.0),
            skip_auto_headers=("User-Agent",),
        )
        app[_PROXY_SESSION] = session
        yield
        await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[_PROXY_SESSION]
        async with session.post(upstream + request.path, data=body, headers=forward_headers) as up:
            response = web.StreamResponse(
                status=up.status,
                headers={"Content-Type": up.headers.get("Content-Type", JSON_TYPE)},
            )
            if up.content_length is not None:
                response.content_length = up.content_length
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


async def serve_proxy(port: int, upstream: str) -> None:
    runner = web.AppRunner(create_proxy_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=1024, reuse_address=True)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_simulator(port: int, latency_scale: float, seed: int) -> None:
    """``tollgate simulate`` with a fixed seed (the CLI does not expose one)."""
    from devtools.simulator import SimulatorConfig, serve

    await serve(HOST, port, SimulatorConfig(latency_scale=latency_scale, seed=seed))


# -- child processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any TOLLGATE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(extra)
    return env


@dataclass
class Child:
    """A server process in its own session (process group), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGINT the group (graceful: the dispatcher flushes), then SIGKILL after ``grace_s``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGINT for {grace_s:.0f}s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Child:
    log_file = log_dir / f"{name}.log"
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, proc, log_file)


async def wait_http(
    url: str, child: Child, timeout_s: float = 60.0, *, kafka: bool = False
) -> None:
    """Poll ``url`` until it answers 200 (and, with ``kafka``, reports Kafka connected)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        if not kafka:
                            return
                        checks = orjson.loads(body).get("checks", {})
                        if checks.get("kafka_connected"):
                            return
                        last = f"readyz checks {checks}"
                    else:
                        last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready at {url} within {timeout_s:.0f}s ({last})")


# -- /proc readers ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> float:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), NaN if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


# -- load generator ----------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of already sorted values."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass
class Phase:
    """Raw figures of one closed-loop phase."""

    latencies: list[float]
    ttfbs: list[float]
    errors: Counter[str]
    wall_s: float
    completion_tokens: int


_DONE = b"data: [DONE]\n\n"


async def drive(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[bytes],
    n: int,
    concurrency: int,
    stream: bool,
) -> Phase:
    """Send ``n`` requests with ``concurrency`` closed-loop clients."""
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: Counter[str] = Counter()
    tokens = 0
    indices: Iterator[int] = iter(range(n))
    perf = time.perf_counter

    async def client() -> None:
        nonlocal tokens
        for i in indices:  # shared iterator: each request is taken by exactly one client
            body = bodies[i % len(bodies)]
            started = perf()
            first: float | None = None
            problem: str | None = None
            try:
                async with session.post(url, data=body, headers=CLIENT_HEADERS) as resp:
                    if stream:
                        tail = b""
                        async for chunk in resp.content.iter_any():
                            if first is None:
                                first = perf()
                            tail = (tail + chunk)[-len(_DONE) :]
                        if resp.status != 200:
                            problem = f"http_{resp.status}"
                        elif tail != _DONE:
                            problem = "stream_without_done"
                    else:
                        data = await resp.read()
                        if resp.status != 200:
                            problem = f"http_{resp.status}"
                        else:
                            usage = orjson.loads(data).get("usage") or {}
                            count = usage.get("completion_tokens")
                            if isinstance(count, int):
                                tokens += count
                            else:
                                problem = "no_usage"
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                problem = type(exc).__name__
            finished = perf()
            if problem is not None:
                errors[problem] += 1
                continue
            latencies.append(finished - started)
            if first is not None:
                ttfbs.append(first - started)

    started = perf()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Phase(latencies, ttfbs, errors, perf() - started, tokens)


@dataclass
class RunResult:
    config: str
    mode: str  # "json" (non-streaming) or "stream"
    concurrency: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    completion_tokens_mean: float | None
    cpu_ms_per_request: dict[str, float]
    generator_cpu_util: float  # fraction of one core used by this process
    host_cpu_busy: float  # fraction of all cores busy on the machine
    other_load_cores: float  # CPU used by processes this benchmark did not start, in cores
    server_peak_rss_mb: float | None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


async def measured_run(
    *,
    config: str,
    url: str,
    concurrency: int,
    requests: int,
    warmup: int,
    stream: bool,
    pids: dict[str, int],
    all_pids: Sequence[int],
    rss_pid: int | None,
) -> RunResult:
    """Warm up, then measure one (configuration, concurrency, mode) run.

    ``pids`` are the processes whose CPU per request is reported by name; ``all_pids`` are
    every process this benchmark started (to tell the machine's other load apart).
    """
    bodies = request_bodies(stream)
    connector = aiohttp.TCPConnector(limit=concurrency * 2, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup:
            await drive(session, url, bodies, warmup, concurrency, stream)
        peak_rss_kb = 0.0
        sampling = True

        async def sample_rss() -> None:
            nonlocal peak_rss_kb
            while sampling and rss_pid is not None:
                rss = status_kb(rss_pid, "VmRSS")
                if not math.isnan(rss):
                    peak_rss_kb = max(peak_rss_kb, rss)
                await asyncio.sleep(RSS_SAMPLE_S)

        sampler = asyncio.create_task(sample_rss())
        cpu_before = {pid: cpu_seconds(pid) for pid in all_pids}
        gen_before = time.process_time()
        host_before = host_cpu()
        phase = await drive(session, url, bodies, requests, concurrency, stream)
        gen_cpu = time.process_time() - gen_before
        host_after = host_cpu()
        cpu_used = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in all_pids}
        sampling = False
        await sampler
    done = len(phase.latencies)
    lat = sorted(phase.latencies)
    ttfb = sorted(phase.ttfbs)
    cpu_ms = {"generator": gen_cpu * 1000 / requests}
    for name, pid in pids.items():
        cpu_ms[name] = cpu_used[pid] * 1000 / requests
    busy = (host_after[0] - host_before[0]) / max(1, host_after[1] - host_before[1])
    ours = gen_cpu + sum(v for v in cpu_used.values() if not math.isnan(v))
    other = (host_after[0] - host_before[0]) / CLK_TCK - ours
    return RunResult(
        config=config,
        mode="stream" if stream else "json",
        concurrency=concurrency,
        requests=requests,
        errors=sum(phase.errors.values()),
        error_kinds=dict(phase.errors),
        wall_s=phase.wall_s,
        rps=done / phase.wall_s,
        p50_ms=percentile(lat, 0.50) * 1000,
        p90_ms=percentile(lat, 0.90) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        mean_ms=(sum(lat) / done * 1000) if done else math.nan,
        max_ms=(lat[-1] * 1000) if done else math.nan,
        ttfb_p50_ms=percentile(ttfb, 0.50) * 1000 if stream else None,
        ttfb_p99_ms=percentile(ttfb, 0.99) * 1000 if stream else None,
        completion_tokens_mean=None if stream else phase.completion_tokens / max(1, done),
        cpu_ms_per_request=cpu_ms,
        generator_cpu_util=gen_cpu / phase.wall_s,
        host_cpu_busy=busy,
        other_load_cores=max(0.0, other / phase.wall_s),
        server_peak_rss_mb=peak_rss_kb / 1024 if rss_pid is not None else None,
    )


# -- dispatcher checks ---------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition (name -> value)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


async def read_metrics(base_url: str) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return parse_metrics(await resp.text())


async def wait_drained(base_url: str, timeout_s: float) -> tuple[dict[str, float], float, float]:
    """Poll /metrics until the spool is empty: (metrics, depth at first look, seconds waited)."""
    started = time.monotonic()
    metrics = await read_metrics(base_url)
    depth_at_start = metrics.get("tollgate_spool_depth", math.nan)
    while metrics.get("tollgate_spool_depth") != 0 and time.monotonic() - started < timeout_s:
        await asyncio.sleep(0.1)
        metrics = await read_metrics(base_url)
    return metrics, depth_at_start, time.monotonic() - started


async def kafka_event_count(bootstrap: str, topics: Sequence[str]) -> int:
    """Sum of the end offsets of ``topics`` (fresh topics: the number of events on them)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic["topic"], part["partition"])
        for topic in described
        for part in topic["partitions"]
    ]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return int(sum(offsets.values()))


# -- orchestration -------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stop_kafka_and_temp(launcher: Any, tmp: Path, keep_temp: bool) -> None:
    """A benchmark's last steps: stop its Kafka (if it started one) and keep or remove its
    temp directory (logs and state). A failed stop is reported, the temp dir still goes."""
    if launcher is not None:
        log("stopping Kafka")
        try:
            launcher.stop()
        except Exception as exc:  # report it, and still remove the temp dir
            log(f"could not stop Kafka: {exc}")
    if keep_temp:
        log(f"kept logs and state in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(markdown_text: str, document: str, json_out: str | None) -> None:
    """Print a benchmark's markdown table and its JSON document; save the JSON if asked."""
    print(markdown_text)
    print()
    print(document)
    if json_out:
        Path(json_out).write_text(document + "\n")
        log(f"wrote {json_out}")


@dataclass
class Plan:
    concurrency: list[int]
    requests: dict[int, int]
    warmup: int
    stream_concurrency: int
    stream_requests: int
    latency_scale: float
    seed: int
    kafka_port: int
    kafka_controller_port: int
    quick: bool
    dispatcher_env: dict[str, str] = field(default_factory=dict)

    def runs(self) -> list[tuple[int, int, bool]]:
        """(concurrency, requests, stream) of every run, in order."""
        runs = [(c, self.requests[c], False) for c in self.concurrency]
        runs.append((self.stream_concurrency, self.stream_requests, True))
        return runs


@dataclass
class Report:
    plan: Plan
    simulator: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    tollgate: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stack:
    """The running servers: one simulator per configuration, the proxy, the dispatcher."""

    simulators: dict[str, Child]
    servers: dict[str, Child]  # "proxy", "tollgate"
    urls: dict[str, str]  # configuration -> base URL the load generator calls
    kafka_pid: int

    def all_pids(self) -> list[int]:
        children = [*self.simulators.values(), *self.servers.values()]
        return [self.kafka_pid, *(c.pid for c in children)]

    def check_alive(self) -> None:
        for child in [*self.simulators.values(), *self.servers.values()]:
            if not child.alive():
                raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")


def simulator_description(latency_scale: float, seed: int) -> dict[str, Any]:
    from devtools.simulator import SimulatorConfig

    cfg = SimulatorConfig(latency_scale=latency_scale, seed=seed)
    ttft = cfg.ttft_ms_median * latency_scale
    per_token = cfg.inter_token_ms * latency_scale
    return {
        "latency_scale": latency_scale,
        "seed": seed,
        "ttft_ms_median": ttft,
        "ttft_sigma": cfg.ttft_sigma,
        "ttft_ms_p99": ttft * math.exp(cfg.ttft_sigma * 2.326),
        "inter_token_ms": per_token,
        "max_tokens": MAX_TOKENS,
        "upstream_ms_median_at_max_tokens": ttft + per_token * MAX_TOKENS,
        "prompt_bytes": [len(b) for b in request_bodies(False)],
    }


def start_stack(
    plan: Plan,
    tmp: Path,
    children: list[Child],
    kafka_pid: int,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> Stack:
    """Start a simulator per configuration (same seed), the floor proxy and the dispatcher."""
    python = sys.executable
    simulators: dict[str, Child] = {}
    sim_urls: dict[str, str] = {}
    for config in CONFIGS:
        port = free_port()
        argv = [python, "-m", "bench.gateway", "--serve-simulator", "--port", str(port)]
        argv += ["--latency-scale", str(plan.latency_scale), "--seed", str(plan.seed)]
        child = spawn(f"simulator-{config}", argv, clean_env(), tmp)
        children.append(child)
        simulators[config] = child
        sim_urls[config] = f"http://{HOST}:{port}"

    proxy_port = free_port()
    argv = [python, "-m", "bench.gateway", "--serve-proxy", "--port", str(proxy_port)]
    proxy = spawn("proxy", [*argv, "--upstream", sim_urls["proxy"]], clean_env(), tmp)
    children.append(proxy)

    dispatcher_port = free_port()
    upstreams = [
        {
            "name": "sim",
            "base_url": f"{sim_urls['tollgate']}/v1",
            "models": [MODEL],
            "price_provider": "openai",
        }
    ]
    tollgate_bin = Path(python).with_name("tollgate")
    argv = [str(tollgate_bin), "serve"] if tollgate_bin.exists() else [python, "-m", "app", "serve"]
    env = clean_env(
        TOLLGATE_DISPATCHER_HOST=HOST,
        TOLLGATE_DISPATCHER_PORT=str(dispatcher_port),
        TOLLGATE_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TOLLGATE_TOPIC_PREFIX=topic_prefix,
        TOLLGATE_STATE_DIR=str(tmp / "dispatcher-state"),
        TOLLGATE_UPSTREAMS=json.dumps(upstreams),
        TOLLGATE_LOG_LEVEL="WARNING",
        TOLLGATE_LOG_FORMAT="json",
        **plan.dispatcher_env,
    )
    dispatcher = spawn("dispatcher", argv, env, tmp)
    children.append(dispatcher)

    stack = Stack(
        simulators=simulators,
        servers={"proxy": proxy, "tollgate": dispatcher},
        urls={
            "direct": sim_urls["direct"],
            "control": sim_urls["control"],
            "proxy": f"http://{HOST}:{proxy_port}",
            "tollgate": f"http://{HOST}:{dispatcher_port}",
        },
        kafka_pid=kafka_pid,
    )

    async def ready() -> None:
        waits = [wait_http(sim_urls[c] + "/healthz", simulators[c]) for c in CONFIGS]
        waits.append(wait_port(proxy_port, proxy))
        waits.append(wait_http(stack.urls["tollgate"] + "/readyz", dispatcher, kafka=True))
        await asyncio.gather(*waits)

    asyncio.run(ready())
    return stack


async def wait_port(port: int, child: Child, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        with contextlib.suppress(OSError):
            _reader, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{child.name} did not listen on {port} within {timeout_s:.0f}s")


def run_all(
    plan: Plan, stack: Stack, kafka_bootstrap: str, topic_prefix: str, report: Report
) -> None:
    """Every run, interleaved: for each (concurrency, kind), direct then proxy then tollgate.

    Interleaving keeps the three configurations of one row close in time, so a change in
    the machine's background load biases them less. After each Tollgate run the bench waits
    until the dispatcher's spool is empty, so event delivery does not bleed into the next run.
    """
    sent_to_tollgate = 0
    drains = []
    for concurrency, requests, stream in plan.runs():
        for config in CONFIGS:
            kind = "stream" if stream else "json"
            log(f"{config}: {kind} c={concurrency} n={requests} (+{plan.warmup} warm-up)")
            server = stack.servers.get(config)
            pids = {"simulator": stack.simulators[config].pid, "kafka": stack.kafka_pid}
            if server is not None:
                pids["server"] = server.pid
            result = asyncio.run(
                measured_run(
                    config=config,
                    url=stack.urls[config] + CHAT_PATH,
                    concurrency=concurrency,
                    requests=requests,
                    warmup=plan.warmup,
                    stream=stream,
                    pids=pids,
                    all_pids=stack.all_pids(),
                    rss_pid=server.pid if server is not None else None,
                )
            )
            stack.check_alive()
            report.runs.append(result)
            log(
                f"  {result.rps:.0f} req/s  p50 {result.p50_ms:.1f} ms  "
                f"p99 {result.p99_ms:.1f} ms  errors {result.errors}  "
                f"generator {result.generator_cpu_util:.0%} of a core  "
                f"host CPU {result.host_cpu_busy:.0%}  other load "
                f"{result.other_load_cores:.2f} cores"
            )
            if config == "tollgate":
                sent_to_tollgate += plan.warmup + requests
                _metrics, depth, waited = asyncio.run(wait_drained(stack.urls["tollgate"], 30))
                drains.append(
                    {"run": f"{kind} c={concurrency}", "spool_depth": depth, "wait_s": waited}
                )

    base = stack.urls["tollgate"]
    metrics = asyncio.run(wait_drained(base, 30))[0]
    topics = [f"{topic_prefix}.requests", f"{topic_prefix}.usage"]
    on_kafka = asyncio.run(kafka_event_count(kafka_bootstrap, topics))
    expected = 2 * sent_to_tollgate  # one Request and one Usage event per call
    delivered = metrics.get("tollgate_events_delivered_total", math.nan)
    dispatcher = stack.servers["tollgate"]
    report.tollgate = {
        "requests_sent": sent_to_tollgate,
        "events_expected": expected,
        "events_delivered_total": delivered,
        "events_on_kafka_topics": on_kafka,
        "spool_depth_after_each_run": drains,
        "spool_depth_final": metrics.get("tollgate_spool_depth", math.nan),
        "vm_hwm_mb": status_kb(dispatcher.pid, "VmHWM") / 1024,
        "vm_rss_mb_end": status_kb(dispatcher.pid, "VmRSS") / 1024,
        "all_events_delivered": delivered == expected == on_kafka
        and metrics.get("tollgate_spool_depth") == 0,
    }
    log(f"tollgate events: {report.tollgate}")
    report.tollgate["first_routed_request"] = asyncio.run(
        first_routed_request(base, dispatcher.pid)
    )
    log(f"first routed request: {report.tollgate['first_routed_request']}")


async def first_routed_request(base_url: str, pid: int) -> dict[str, Any]:
    """The dispatcher loads the router's failure model (numpy, River, scipy) for its first
    ``model: "auto"`` request, in a thread. After the runs (which name their model, so nothing
    was routed): the first and second routed requests' latency, how slow unrouted requests sent
    one after another meanwhile were, and the dispatcher's RSS before and after."""
    # no max_tokens: the simulator's natural answer is longer than MAX_TOKENS, and a truncated
    # economy answer escalates to gpt-4o, which the bench's upstream does not serve
    question = [{"role": "user", "content": "What is the capital of France?"}]
    routed = orjson.dumps({"model": "auto", "messages": question})
    plain = request_bodies(stream=False)[0]
    headers = {"Content-Type": "application/json"}
    rss_before = status_kb(pid, "VmRSS") / 1024
    async with aiohttp.ClientSession() as session:
        errors: list[str] = []

        async def timed(body: bytes) -> tuple[float, int]:
            started = time.perf_counter()
            async with session.post(base_url + CHAT_PATH, data=body, headers=headers) as reply:
                answer = await reply.read()
                if reply.status != 200:
                    errors.append(answer[:300].decode(errors="replace"))
                return (time.perf_counter() - started) * 1000, reply.status

        first = asyncio.ensure_future(timed(routed))
        during: list[float] = []
        while not first.done():
            during.append((await timed(plain))[0])
        first_ms, first_status = await first
        second_ms, second_status = await timed(routed)
    return {
        "first_ms": round(first_ms, 1),
        "second_ms": round(second_ms, 1),
        "statuses": [first_status, second_status],
        "errors": errors[:2],
        "unrouted_during_load": len(during),
        "unrouted_during_load_max_ms": round(max(during), 1) if during else None,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(status_kb(pid, "VmRSS") / 1024, 1),
    }


def summarise(report: Report) -> None:
    """Added latency vs direct, the p99 ratio against the floor, and target verdicts."""
    by_key = {(r.config, r.mode, r.concurrency): r for r in report.runs}
    for r in report.runs:
        base = by_key.get(("direct", r.mode, r.concurrency))
        if base is not None and r.config != "direct":
            r.added_p50_ms = r.p50_ms - base.p50_ms
            r.added_p99_ms = r.p99_ms - base.p99_ms
    ratios = []
    for r in report.runs:
        floor = by_key.get(("proxy", r.mode, r.concurrency))
        control = by_key.get(("control", r.mode, r.concurrency))
        if r.config != "tollgate" or floor is None:
            continue
        if r.added_p99_ms is None or floor.added_p99_ms is None:
            continue
        noise = abs(control.added_p99_ms or 0.0) if control is not None else 0.0
        # A floor below the A/A noise is no measurable floor: judge against the noise.
        floor_p99 = max(floor.added_p99_ms, noise)
        ratio = r.added_p99_ms / floor_p99 if floor_p99 > 0 else None
        ratios.append(
            {
                "mode": r.mode,
                "concurrency": r.concurrency,
                "floor_added_p99_ms": floor.added_p99_ms,
                "tollgate_added_p99_ms": r.added_p99_ms,
                "noise_p99_ms": noise,
                "tollgate_minus_floor_p99_ms": r.added_p99_ms - floor.added_p99_ms,
                "floor_within_noise": floor.added_p99_ms <= noise,
                "ratio": ratio,
                "meets_target": r.added_p99_ms <= TARGET_RATIO * floor_p99,
            }
        )
    c_max = max(report.plan.concurrency)
    peak = by_key.get(("tollgate", "json", c_max))
    rss = peak.server_peak_rss_mb if peak is not None else None
    report.summary = {
        "added_p99_ratio_target": TARGET_RATIO,
        "added_p99_ratios": ratios,
        "dispatcher_peak_rss_mb": rss,
        "dispatcher_peak_rss_at_concurrency": c_max,
        "rss_target_mb": TARGET_RSS_MB,
        "rss_meets_target": rss is not None and rss < TARGET_RSS_MB,
        "generator_cpu_bound": [
            f"{r.config} {r.mode} c={r.concurrency}"
            for r in report.runs
            if r.generator_cpu_util >= 0.9
        ],
        "max_other_load_cores": max((r.other_load_cores for r in report.runs), default=0.0),
    }


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    sim = report.simulator
    m = report.machine
    env = " ".join(f"{k}={v}" for k, v in report.plan.dispatcher_env.items())
    env_note = f" Dispatcher settings: `{env}`." if env else ""
    lines = [
        "## Tollgate gateway overhead",
        "",
        f"Simulator: `latency_scale={sim['latency_scale']}` -> TTFT median "
        f"{sim['ttft_ms_median']:.0f} ms (lognormal sigma={sim['ttft_sigma']}, p99 ~ "
        f"{sim['ttft_ms_p99']:.0f} ms) + {sim['inter_token_ms']:.1f} ms/token x "
        f"{sim['max_tokens']} tokens = ~{sim['upstream_ms_median_at_max_tokens']:.0f} ms "
        f"median upstream time; seed {sim['seed']}, one simulator per configuration. "
        f"Prompts of {', '.join(str(b) for b in sim['prompt_bytes'])} bytes, round-robin, "
        f"`max_tokens={sim['max_tokens']}`. {m.get('cpus')} CPUs, Python {m.get('python')}; "
        f"Other processes' load before the runs: {m.get('other_load_before_runs', math.nan):.2f} "
        f"cores.{env_note}",
        "",
        "| config | kind | c | n | err | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms "
        "| server CPU ms/req | sim CPU ms/req | Kafka CPU ms/req | gen CPU ms/req "
        "| gen % core | host busy | other load |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report.runs:
        kind = "stream (last byte)" if r.mode == "stream" else "json"
        cpu = r.cpu_ms_per_request
        lines.append(
            f"| {r.config} | {kind} | {r.concurrency} | {r.requests} | {r.errors} "
            f"| {r.rps:.0f} | {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} "
            f"| {_fmt(r.added_p50_ms, signed=True)} | {_fmt(r.added_p99_ms, signed=True)} "
            f"| {_fmt(cpu.get('server'), 2)} | {_fmt(cpu.get('simulator'), 2)} "
            f"| {_fmt(cpu.get('kafka'), 2)} | {_fmt(cpu.get('generator'), 2)} "
            f"| {r.generator_cpu_util:.0%} | {r.host_cpu_busy:.0%} "
            f"| {r.other_load_cores:.2f} |"
        )
    s = report.summary
    lines += [
        "",
        "| kind | c | floor +p99 ms | tollgate +p99 ms | tollgate - floor ms "
        "| A/A noise ms | tollgate / floor | target <= 1.5 |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for ratio in s["added_p99_ratios"]:
        shown = _fmt(ratio["ratio"], 2)
        if ratio["floor_within_noise"]:
            shown += " (floor within noise: / noise)"
        lines.append(
            f"| {ratio['mode']} | {ratio['concurrency']} | {ratio['floor_added_p99_ms']:+.1f} "
            f"| {ratio['tollgate_added_p99_ms']:+.1f} "
            f"| {ratio['tollgate_minus_floor_p99_ms']:+.1f} | {ratio['noise_p99_ms']:.1f} "
            f"| {shown} | {'met' if ratio['meets_target'] else 'MISSED'} |"
        )
    t = report.tollgate
    rss = s["dispatcher_peak_rss_mb"]
    lines += [
        "",
        f"- Dispatcher peak RSS (VmRSS sampled every {RSS_SAMPLE_S * 1000:.0f} ms) during the "
        f"json c={s['dispatcher_peak_rss_at_concurrency']} run: {_fmt(rss)} MB; VmHWM over "
        f"the whole run {_fmt(t.get('vm_hwm_mb'))} MB; target < {TARGET_RSS_MB:.0f} MB: "
        f"{'met' if s['rss_meets_target'] else 'MISSED'}.",
    ]
    first = t.get("first_routed_request") if t else None
    if first:
        lines.append(
            f'- First `model: "auto"` request after the runs (loads the router\'s model: numpy, '
            f"River): {first['first_ms']} ms, the next {first['second_ms']} ms; "
            f"{first['unrouted_during_load']} unrouted requests sent one at a time meanwhile, "
            f"slowest {first['unrouted_during_load_max_ms']} ms; RSS {first['rss_mb_before']} -> "
            f"{first['rss_mb_after']} MB."
        )
    if t:
        depths = ", ".join(
            f"{d['run']}: {d['spool_depth']:.0f} ({d['wait_s']:.1f} s to 0)"
            for d in t["spool_depth_after_each_run"]
        )
        lines.append(
            f"- Events: {t['requests_sent']} requests sent to Tollgate (incl. warm-ups) -> "
            f"{t['events_expected']} expected (Request + Usage each); "
            f"`tollgate_events_delivered_total` {t['events_delivered_total']:.0f}; "
            f"end offsets of the two topics {t['events_on_kafka_topics']}; "
            f"`tollgate_spool_depth` right after each run: {depths}; final "
            f"{t['spool_depth_final']:.0f}. "
            f"{'All delivered.' if t['all_events_delivered'] else 'NOT ALL DELIVERED.'}"
        )
    bound = s["generator_cpu_bound"]
    lines.append(
        f"- Load generator >= 90% of a core (CPU-bound) in: {', '.join(bound)}."
        if bound
        else "- Load generator below 90% of one core in every run (not CPU-bound)."
    )
    lines.append(
        "- `control` is `direct` again (own simulator, same seed, run last in each round): "
        "its +p50/+p99 are the measurement noise (A/A)."
    )
    lines.append(
        "- `other load` = CPU used by processes this benchmark did not start (cores); "
        f"max {s['max_other_load_cores']:.2f}."
    )
    return "\n".join(lines)


def plan_from_args(args: argparse.Namespace) -> Plan:
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrency or min(concurrency) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 16,64")
    for item in args.dispatcher_env:
        if not item.startswith("TOLLGATE_") or "=" not in item:
            raise SystemExit(f"--dispatcher-env wants TOLLGATE_NAME=VALUE, got {item!r}")
    requests = {}
    for c in concurrency:
        if args.requests:
            requests[c] = args.requests
        else:
            full = 2000 if c <= 16 else 4000
            requests[c] = max(c * 4, full // 7) if args.quick else full
    warmup = args.warmup if args.warmup is not None else (50 if args.quick else 200)
    return Plan(
        concurrency=concurrency,
        requests=requests,
        warmup=warmup,
        stream_concurrency=args.stream_concurrency,
        stream_requests=args.stream_requests or (300 if args.quick else 2000),
        latency_scale=args.latency_scale,
        seed=args.seed,
        kafka_port=args.kafka_port,
        kafka_controller_port=args.kafka_controller_port,
        quick=args.quick,
        dispatcher_env=dict(item.split("=", 1) for item in args.dispatcher_env),
    )


def other_load(seconds: float, our_pids: Sequence[int]) -> float:
    """CPU (in cores) used over ``seconds`` by processes other than ours and ``our_pids``."""
    before = host_cpu()
    ours_before = time.process_time() + sum(cpu_seconds(pid) for pid in our_pids)
    time.sleep(seconds)
    after = host_cpu()
    ours = time.process_time() + sum(cpu_seconds(pid) for pid in our_pids) - ours_before
    return max(0.0, ((after[0] - before[0]) / CLK_TCK - ours) / seconds)


def wait_quiet(max_wait_s: float, our_pids: Sequence[int] = ()) -> float:
    """Wait (at most ``max_wait_s``) until other processes use < QUIET_CORES for 2 s.

    Returns the last load seen (cores). Figures from a shared machine are only comparable
    when nothing else competes for its cores; every run reports that load anyway
    (``other_load_cores``).
    """
    deadline = time.monotonic() + max_wait_s
    load = other_load(2.0, our_pids)
    while load >= QUIET_CORES and time.monotonic() < deadline:
        log(f"other processes use {load:.2f} cores; waiting for < {QUIET_CORES}")
        load = other_load(2.0, our_pids)
    if load >= QUIET_CORES:
        log(f"other processes still use {load:.2f} cores after {max_wait_s:.0f} s: going on")
    return load


def run_benchmark(args: argparse.Namespace) -> int:
    from app.events.topics import ensure_topics
    from app.settings import Settings
    from devtools.kafka_local import LocalKafka

    plan = plan_from_args(args)
    report = Report(plan=plan, simulator=simulator_description(plan.latency_scale, plan.seed))
    report.machine = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "other_load_before_start": wait_quiet(args.wait_quiet),
    }
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    children: list[Child] = []
    launcher: LocalKafka | None = None
    topic_prefix = f"bench{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        kafka_settings = Settings(
            kafka_bootstrap=f"{HOST}:{plan.kafka_port}",
            kafka_controller_port=plan.kafka_controller_port,
            state_dir=tmp / "kafka-state",
            topic_prefix=topic_prefix,
        )
        log(f"starting Kafka on {kafka_settings.kafka_bootstrap} (state in {tmp})")
        launcher = LocalKafka(kafka_settings)
        kafka = launcher.start()
        log(f"Kafka ready in {kafka.start_seconds:.1f}s (pid {kafka.pid}); ensuring topics")
        asyncio.run(ensure_topics(kafka_settings))
        stack = start_stack(
            plan, tmp, children, kafka.pid, kafka_settings.kafka_bootstrap, topic_prefix
        )
        log("simulators, proxy and dispatcher ready")
        report.machine["other_load_before_runs"] = wait_quiet(
            min(args.wait_quiet, 30.0), stack.all_pids()
        )
        run_all(plan, stack, kafka_settings.kafka_bootstrap, topic_prefix, report)
    finally:
        for child in reversed(children):
            child.stop()
        stop_kafka_and_temp(launcher, tmp, args.keep_temp)
    report.machine["total_seconds"] = round(time.monotonic() - started, 1)
    summarise(report)
    document = orjson.dumps(
        asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    ).decode()
    publish(markdown(report), document, args.json_out)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description="Latency Tollgate adds vs a direct call and vs a minimal aiohttp proxy.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run < 60 s")
    parser.add_argument("--concurrency", default="16,64", help="comma list (default 16,64)")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (override)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per run")
    parser.add_argument("--stream-concurrency", type=int, default=16)
    parser.add_argument("--stream-requests", type=int, default=None)
    parser.add_argument(
        "--latency-scale",
        type=float,
        default=0.1,
        help="simulator delay multiplier (0.1: TTFT median 20 ms, 0.5 ms/token)",
    )
    parser.add_argument("--seed", type=int, default=20240601, help="simulator latency seed")
    parser.add_argument("--kafka-port", type=int, default=39092)
    parser.add_argument("--kafka-controller-port", type=int, default=39093)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="wait up to this many seconds for the machine to be idle first (default 60)",
    )
    parser.add_argument("--json-out", default=None, help="also write the JSON figures here")
    parser.add_argument(
        "--dispatcher-env",
        action="append",
        default=[],
        metavar="TOLLGATE_X=VALUE",
        help="extra setting for the dispatcher, e.g. TOLLGATE_SPOOL_FSYNC=never (repeatable)",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and state")
    # internal: the child processes this benchmark starts
    parser.add_argument("--serve-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-simulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _sigterm_to_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_proxy or args.serve_simulator:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            if args.serve_proxy:
                asyncio.run(serve_proxy(args.port, args.upstream))
            else:
                asyncio.run(serve_simulator(args.port, args.latency_scale, args.seed))
        return 0
    signal.signal(signal.SIGTERM, _sigterm_to_exit)  # so that `finally` cleans up
    # A background job starts with SIGINT ignored, and children would inherit that (then
    # they could not shut down gracefully): catch it, so that exec resets it to default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
