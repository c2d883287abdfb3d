"""The fault-injection harness: the real stack, one process per component, and ledgers by id.

Owns what the fault tests share:

- ``Component``: one ``tollgate <command>`` process (its own session, so signals reach
  its whole process group) that can be started, SIGKILLed, SIGSTOPped, SIGCONTed and
  stopped; ``KafkaNode``: the broker, started with ``tollgate kafka start``;
- ``FaultStack``: simulator, dispatcher, spend worker, sink and anomaly agent on free
  ports, with a state dir and a topic prefix of their own, and readiness probes that
  poll a condition (never a fixed sleep);
- ``LoadGenerator``: N concurrent clients, half streamed, each its own user, half through
  the real ``openai`` SDK and half through plain HTTP; it records every X-Request-Id and
  status it gets back;
- readers that count events and rows by id (``audit``), and what the worker counted.

It does not own what a test asserts: each test in this folder states its fault and its
expectations, and ``FaultRow`` carries the figures to the printed fault table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.budgets.spend import event_cost
from app.events.codec import EventCodec
from app.events.compacted import assigned_partitions
from app.settings import Settings
from tests.ports import free_port

TOLLGATE = str(Path(sys.executable).with_name("tollgate"))  # this venv's console script
MODEL = "gpt-4o-mini"
USER_POLICY_LIMIT_USD = "1000000"  # a cap on every user, far above any test's spend


class ComponentDied(AssertionError):
    """A component exited while a test waited on it: no point waiting any longer."""


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> float:
    """Poll ``check`` until it holds; returns the seconds it took. Fails naming ``what``."""
    started = time.monotonic()
    deadline = started + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic() - started
            last_error = None
        except ComponentDied:
            raise
        except Exception as exc:  # a probe of a service that is still starting
            last_error = exc
        time.sleep(every_s)
    raise AssertionError(
        f"timed out after {timeout_s:.0f}s waiting for {what}"
        + (f" (last error: {last_error!r})" if last_error else "")
    )


# -- processes ---------------------------------------------------------------------------
class Component:
    """One long-running ``tollgate`` command as its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped and not yet continued
        self.starts = 0

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        self.stopped = False

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """SIGKILL, whatever it is doing, and reap it."""
        if self.process is None:
            return
        self.signal(signal.SIGKILL)
        self.process.wait(30)
        self.stopped = False

    def stall(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Graceful stop (SIGINT, as Ctrl-C), then SIGTERM, then SIGKILL."""
        if not self.alive():
            return
        assert self.process is not None
        if self.stopped:
            self.resume()
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 10.0)):
            self.signal(sig)
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
        self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class KafkaNode:
    """The broker under test, started by ``tollgate kafka start`` and found by its pid file."""

    def __init__(self, bootstrap: str, controller_port: int, state_dir: Path) -> None:
        self.bootstrap = bootstrap
        self.controller_port = controller_port
        self.state_dir = state_dir
        self.stopped = False

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TOLLGATE_KAFKA_BOOTSTRAP": self.bootstrap,
            "TOLLGATE_KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "TOLLGATE_STATE_DIR": str(self.state_dir),
        }

    def pid(self) -> int | None:
        from devtools.kafka_local import LocalKafka

        settings = Settings(
            kafka_bootstrap=self.bootstrap,
            kafka_controller_port=self.controller_port,
            state_dir=self.state_dir,
        )
        return LocalKafka(settings).status().pid

    def start(self) -> None:
        """``tollgate kafka start``: returns once the broker answers metadata requests."""
        result = subprocess.run(
            [TOLLGATE, "kafka", "start"], env=self.env, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"tollgate kafka start failed: {result.stdout}{result.stderr}")

    def kill(self) -> None:
        pid = self.pid()
        if pid is None:
            raise RuntimeError("the broker is not running")
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: self.pid() is None, 30, "the broker to die")

    def stall(self) -> None:
        pid = self.pid()
        assert pid is not None, "the broker is not running"
        os.killpg(pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.killpg(pid, signal.SIGCONT)
        self.stopped = False

    def ensure_running(self) -> None:
        """After a fault, whatever happened: continue it if stopped, start it if dead."""
        if self.stopped:
            self.resume()
        if self.pid() is None:
            self.start()


# -- the stack ---------------------------------------------------------------------------
ALL_COMPONENTS = ("simulator", "worker", "sink", "anomaly", "dispatcher")


class FaultStack:
    """Every component as its own process, on free ports, with its own state and topics."""

    def __init__(
        self,
        bootstrap: str,
        root: Path,
        *,
        latency_scale: float = 1.0,
        env: dict[str, str] | None = None,
        component_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.root = root
        self.tag = f"f{uuid.uuid4().hex[:8]}"
        self.settings = Settings(
            kafka_bootstrap=bootstrap,
            topic_prefix=self.tag,
            topic_partitions=3,
            state_dir=root / "state",
            dispatcher_port=free_port(),
            simulator_port=free_port(),
            reports_port=free_port(),
        )
        s = self.settings
        self.url = s.dispatcher_url
        base_env = {
            key: value for key, value in os.environ.items() if not key.startswith("TOLLGATE_")
        }
        self.env = {
            **base_env,
            "PYTHONUNBUFFERED": "1",
            "TOLLGATE_KAFKA_BOOTSTRAP": bootstrap,
            "TOLLGATE_TOPIC_PREFIX": s.topic_prefix,
            "TOLLGATE_TOPIC_PARTITIONS": str(s.topic_partitions),
            "TOLLGATE_STATE_DIR": str(s.state_dir),
            "TOLLGATE_DISPATCHER_PORT": str(s.dispatcher_port),
            "TOLLGATE_SIMULATOR_PORT": str(s.simulator_port),
            "TOLLGATE_REPORTS_PORT": str(s.reports_port),
            "TOLLGATE_LOG_FORMAT": "json",
            **(env or {}),
        }
        logs = root / "logs"
        per = component_env or {}
        argv = {
            "simulator": [TOLLGATE, "simulate", "--latency-scale", str(latency_scale)],
            "worker": [TOLLGATE, "worker"],
            "sink": [TOLLGATE, "sink"],
            "anomaly": [TOLLGATE, "anomaly"],
            "dispatcher": [TOLLGATE, "serve"],
        }
        self.components = {
            name: Component(
                name, argv[name], {**self.env, **per.get(name, {})}, logs / f"{name}.log"
            )
            for name in ALL_COMPONENTS
        }
        self.codec = EventCodec()

    def __getitem__(self, name: str) -> Component:
        return self.components[name]

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [TOLLGATE, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"tollgate {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    # -- start-up ------------------------------------------------------------------------
    def start(self, components: tuple[str, ...] = ALL_COMPONENTS) -> None:
        self.cli("topics", "ensure")
        self.cli("budgets", "set", "user:*", "--monthly", USER_POLICY_LIMIT_USD)
        for name in ALL_COMPONENTS:
            if name in components:
                self.components[name].start()
        self.wait_ready(components)

    def wait_ready(self, components: tuple[str, ...] = ALL_COMPONENTS, timeout_s: float = 180):
        for name in components:
            self.check_alive(name)
        if "simulator" in components:
            wait_for(self.simulator_ready, timeout_s, "the simulator")
        if "dispatcher" in components:
            wait_for(self.dispatcher_ready, timeout_s, "the dispatcher")
        if "sink" in components:
            wait_for(lambda: self.port_open(self.settings.reports_port), timeout_s, "the sink")
        consumers = [n for n in ("worker", "sink") if n in components]
        if consumers:
            # A probe event proves the consumer groups are joined and consuming.
            self.report_usage(user_id=f"{self.tag}-probe")
            ends = self.end_offsets("usage")
            for name in consumers:
                wait_for(
                    lambda n=name: self.check_alive(n) and self.caught_up(n, ends),
                    timeout_s,
                    f"the {name} to consume",
                )

    def check_alive(self, name: str) -> bool:
        component = self.components[name]
        if component.process is not None and not component.alive():
            raise ComponentDied(
                f"{name} exited with code {component.returncode()}; last lines of "
                f"{component.log_path}:\n{component.log_tail()}"
            )
        return True

    @staticmethod
    def port_open(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def simulator_ready(self) -> bool:
        self.check_alive("simulator")
        url = f"{self.settings.simulator_url}/healthz"
        return httpx.get(url, timeout=2).status_code == 200

    def dispatcher_ready(self) -> bool:
        self.check_alive("dispatcher")
        ready = httpx.get(f"{self.url}/readyz", timeout=2).json()
        checks = ready.get("checks", {})
        return bool(ready.get("ready") and checks.get("kafka_connected"))

    def spool_depth(self) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("tollgate_spool_depth "):
                return float(line.split()[1])
        raise AssertionError("no tollgate_spool_depth metric")

    def report_usage(self, user_id: str) -> None:
        response = httpx.post(
            f"{self.url}/v1/usage",
            json={"model": MODEL, "prompt_tokens": 3, "completion_tokens": 2, "user_id": user_id},
            timeout=10,
        )
        assert response.status_code == 202, response.text

    def stop(self) -> None:
        for component in reversed(list(self.components.values())):
            with contextlib.suppress(Exception):
                component.stop()

    # -- Kafka reads ---------------------------------------------------------------------
    def group_of(self, component: str) -> str:
        prefix = self.settings.topic_prefix
        return {"sink": f"{prefix}-clickhouse-sink", "worker": f"{prefix}-spend"}[component]

    def end_offsets(self, *suffixes: str) -> dict[TopicPartition, int]:
        return _run(_end_offsets(self.settings, [self.settings.topic(s) for s in suffixes]))

    def caught_up(self, component: str, ends: dict[TopicPartition, int]) -> bool:
        """The component's group has committed every offset below ``ends``."""
        return not self.behind(component, ends)

    def behind(self, component: str, ends: dict[TopicPartition, int]) -> dict[str, int]:
        """Records below ``ends`` the component's group has not committed, per partition."""
        committed = _run(_committed(self.settings, self.group_of(component)))
        return {
            f"{tp.topic}[{tp.partition}]": end - committed.get(tp, 0)
            for tp, end in ends.items()
            if committed.get(tp, 0) < end
        }

    def read(self, suffix: str) -> list[dict[str, Any]]:
        """Every event on a topic, decoded, from the beginning to its current end."""
        return _run(_read_topic(self.settings, self.settings.topic(suffix), self.codec))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = await _all_partitions(consumer, topics)
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def _all_partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` (a consumer without a group is assigned all of them)."""
    partitions = await assigned_partitions(consumer, timeout_s=30)
    found = {tp.topic for tp in partitions}
    if found != set(topics):
        raise AssertionError(f"no partitions found for {sorted(set(topics) - found)}")
    return partitions


async def _committed(settings: Settings, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def _read_topic(settings: Settings, topic: str, codec: EventCodec) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = await _all_partitions(consumer, [topic])
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[dict[str, Any]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset >= ends[tp]:
                        continue
                    record = codec.decode(
                        m.value, topic=m.topic, partition=m.partition, offset=m.offset
                    ).record
                    record["_partition"], record["_offset"] = m.partition, m.offset
                    records.append(record)
        return records
    finally:
        await consumer.stop()


# -- load --------------------------------------------------------------------------------
@dataclass
class Answer:
    client: int
    user: str
    kind: str  # "sdk" or "http"
    stream: bool
    status: int | None  # None: no HTTP answer at all (refused, reset before headers)
    request_id: str | None
    complete: bool  # the whole body (or stream, up to [DONE]) arrived
    error: str = ""


class LoadGenerator:
    """``clients`` threads, each its own user; even clients use the ``openai`` SDK, odd ones
    plain HTTP; half of each kind stream. Every answer is recorded with its X-Request-Id."""

    def __init__(
        self,
        url: str,
        tag: str,
        clients: int = 16,
        *,
        max_tokens: int = 60,
        think_s: float = 0.02,
        timeout_s: float = 120.0,
        headers: Callable[[int, int], dict[str, str]] | None = None,
    ) -> None:
        self.url = url
        self.tag = tag
        self.clients = clients
        self.max_tokens = max_tokens
        self.think_s = think_s
        self.timeout_s = timeout_s
        self.headers = headers or (lambda client, seq: {})
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def user(self, client: int) -> str:
        return f"{self.tag}-u{client:02d}"

    def start(self) -> None:
        for client in range(self.clients):
            thread = threading.Thread(target=self._run, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 30)
        stuck = [t for t in self._threads if t.is_alive()]
        assert not stuck, f"{len(stuck)} load clients did not finish"

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answered(self, status: int | None = 200) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.status == status and a.request_id)

    def wait_answers(self, more: int, timeout_s: float = 180, status: int | None = 200) -> None:
        """Block until ``more`` further answers with ``status`` arrived."""
        target = self.answered(status) + more
        wait_for(lambda: self.answered(status) >= target, timeout_s, f"{more} more answers")

    def _record(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def _run(self, client: int) -> None:
        import openai

        kind = "sdk" if client % 2 == 0 else "http"
        stream = (client // 2) % 2 == 0
        user = self.user(client)
        sdk = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=self.timeout_s
        )
        http = httpx.Client(timeout=self.timeout_s)
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                messages = [{"role": "user", "content": f"client {client} call {seq}: count me"}]
                headers = self.headers(client, seq)
                if kind == "sdk":
                    answer = self._sdk_call(sdk, client, user, stream, messages, headers)
                else:
                    answer = self._http_call(http, client, user, stream, messages, headers)
                self._record(answer)
                if answer.status is None:
                    self._stop.wait(0.2)  # the dispatcher is down: do not spin
                elif self.think_s:
                    self._stop.wait(self.think_s)
        finally:
            http.close()
            sdk.close()

    def _sdk_call(
        self,
        sdk: Any,
        client: int,
        user: str,
        stream: bool,
        messages: list[dict[str, str]],
        headers: dict[str, str],
    ) -> Answer:
        import openai

        answer = Answer(client, user, "sdk", stream, None, None, False)
        try:
            raw = sdk.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=messages,
                user=user,
                max_tokens=self.max_tokens,
                stream=stream,
                extra_headers=headers,
            )
            answer.status, answer.request_id = raw.status_code, raw.headers.get("x-request-id")
            parsed = raw.parse()
            if stream:
                for _chunk in parsed:
                    pass
            answer.complete = True
        except openai.APIStatusError as exc:
            answer.status = exc.status_code
            answer.request_id = exc.response.headers.get("x-request-id")
            answer.complete = True
            answer.error = str(exc)[:200]
        except Exception as exc:  # refused, reset, or a stream cut short
            answer.error = repr(exc)[:200]
        return answer

    def _http_call(
        self,
        http: httpx.Client,
        client: int,
        user: str,
        stream: bool,
        messages: list[dict[str, str]],
        headers: dict[str, str],
    ) -> Answer:
        answer = Answer(client, user, "http", stream, None, None, False)
        body = {
            "model": MODEL,
            "messages": messages,
            "user": user,
            "max_tokens": self.max_tokens,
            "stream": stream,
        }
        try:
            with http.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                answer.status = response.status_code
                answer.request_id = response.headers.get("x-request-id")
                if stream and response.status_code == 200:
                    done = False
                    for line in response.iter_lines():
                        done = done or line.strip() == "data: [DONE]"
                    answer.complete = done
                else:
                    response.read()
                    answer.complete = True
        except Exception as exc:
            answer.error = repr(exc)[:200]
        return answer


# -- what happened, by id -----------------------------------------------------------------
@dataclass
class Audit:
    """Every count of one run, by id. ``problems`` lists each lost or duplicated item."""

    answered: int = 0  # answers that carried an X-Request-Id
    answered_by_status: dict[int, int] = field(default_factory=dict)
    requests: int = 0  # distinct request ids with a Request event (accepted by a dispatcher)
    usage_events: int = 0  # distinct Usage event ids of those requests
    request_rows: int = 0
    usage_rows: int = 0
    worker_checked_users: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"answered {self.answered} {dict(sorted(self.answered_by_status.items()))}, "
            f"Request events {self.requests}, Usage events {self.usage_events}, rows "
            f"{self.request_rows}+{self.usage_rows}, worker-checked users "
            f"{self.worker_checked_users}; lost {len(self.lost)}, duplicated "
            f"{len(self.duplicated)}"
        )

    def failures(self) -> str:
        return "\n".join(
            [self.summary()]
            + [f"LOST {item}" for item in self.lost[:15]]
            + [f"DUPLICATED {item}" for item in self.duplicated[:15]]
        )


def audit_events(stack: FaultStack, answers: list[Answer], audit: Audit) -> dict[str, Any]:
    """Requests answered vs Request and Usage events on Kafka, by request id and event id."""
    prefix = f"{stack.tag}-u"
    answered = {a.request_id: a for a in answers if a.request_id}
    audit.answered = len(answered)
    for a in answered.values():
        if a.status is not None:
            audit.answered_by_status[a.status] = audit.answered_by_status.get(a.status, 0) + 1
    requests: dict[str, set[str]] = defaultdict(set)
    request_event_ids: set[str] = set()  # every Request event of the run, accepted or not
    for event in stack.read("requests"):
        if event["user_id"].startswith(prefix):
            request_event_ids.add(event["event_id"])
            if event["status"] == "accepted":
                requests[event["request_id"]].add(event["event_id"])
    usage_by_request: dict[str, set[str]] = defaultdict(set)
    usage_by_id: dict[str, dict[str, Any]] = {}
    for event in stack.read("usage"):
        if event["user_id"].startswith(prefix):
            usage_by_request[event["request_id"]].add(event["event_id"])
            # The first of two events with one id is the one every consumer keeps (a
            # settler's estimate and a late real usage); the topic is read in offset order.
            usage_by_id.setdefault(event["event_id"], event)
    audit.requests = len(requests)
    audit.usage_events = len(usage_by_id)
    for request_id, answer in answered.items():
        if request_id not in requests:
            audit.lost.append(f"{request_id}: answered {answer.status}, no Request event")
    for request_id, ids in requests.items():
        if len(ids) > 1:
            audit.duplicated.append(f"{request_id}: {len(ids)} different Request events")
        usage = usage_by_request.get(request_id, set())
        if not usage:
            how = answered.get(request_id)
            state = f"answered {how.status}, complete={how.complete}" if how else "no answer"
            audit.lost.append(f"{request_id}: Request event but no Usage event ({state})")
        elif len(usage) > 1:
            audit.duplicated.append(f"{request_id}: {len(usage)} different Usage events")
    for request_id in usage_by_request.keys() - requests.keys():
        audit.lost.append(f"{request_id}: a Usage event without its Request event")
    return {"requests": request_event_ids, "usage": usage_by_id}


def audit_worker(
    stack: FaultStack, usage_by_id: dict[str, dict[str, Any]], audit: Audit, timeout_s: float
) -> None:
    """The spend worker's count per user equals the sum of that user's distinct usage
    events in the decision's period, to the nano-dollar."""
    expected_users = {event["user_id"] for event in usage_by_id.values()}

    def mismatches() -> list[str]:
        decisions: dict[str, dict[str, Any]] = {}
        for decision in stack.read("budget.decisions"):
            held = decisions.get(decision["scope"])
            if held is None or decision["ts"] >= held["ts"]:
                decisions[decision["scope"]] = decision
        wrong = []
        for user in sorted(expected_users):
            decision = decisions.get(f"user:{user}")
            if decision is None:
                wrong.append(f"user:{user}: no decision")
                continue
            start: datetime = decision["period_start"]
            end: datetime = decision["resets_at"]
            expected = sum(
                event_cost(e)
                for e in usage_by_id.values()
                if e["user_id"] == user and start <= e["ts"] < end
            )
            if decision["spent_usd_nanos"] != expected:
                # Where it counts through against where the user's events lie tells a stale
                # decision (offsets behind) from a lost count (offsets past every event).
                mine = sorted(
                    (e["_partition"], e["_offset"])
                    for e in usage_by_id.values()
                    if e["user_id"] == user and "_partition" in e
                )
                wrong.append(
                    f"user:{user}: worker counted {decision['spent_usd_nanos']} nano-USD, the "
                    f"distinct usage events sum to {expected} "
                    f"({decision['spent_usd_nanos'] - expected:+d}); the decision (reason "
                    f"{decision.get('reason')!r}) counts through {decision.get('counted_offsets')}, "
                    f"the user's last event is at {mine[-1] if mine else None}"
                )
        return wrong

    ends = stack.end_offsets("usage")
    try:
        wait_for(lambda: stack.caught_up("worker", ends), timeout_s, "the worker to catch up")
        wait_for(lambda: not mismatches(), timeout_s, "the worker's counts to match", 1.0)
    except AssertionError:
        audit.lost.extend(f"spend worker: {m}" for m in mismatches())
    audit.worker_checked_users = len(expected_users)


def audit_warehouse(stack: FaultStack, events: dict[str, Any], audit: Audit, timeout_s: float):
    """Every Request and Usage event is one warehouse row, by event id, and the per-user
    rollups hold each Usage event once (read after the sink has committed everything and
    stopped: embedded chdb has one owner at a time)."""
    ends = stack.end_offsets("requests", "usage")
    wait_for(
        lambda: stack.check_alive("sink") and stack.caught_up("sink", ends),
        timeout_s,
        "the sink to commit every event",
    )
    stack["sink"].stop()
    rows = warehouse_rows(stack.settings, stack.tag)
    for table, wanted in (
        ("request_events", events["requests"]),
        ("usage_events", set(events["usage"])),
    ):
        counts = rows[table]
        for event_id in wanted:
            found = counts.get(event_id, 0)
            if found == 0:
                audit.lost.append(f"{table}: no row for event {event_id}")
            elif found > 1:
                audit.duplicated.append(f"{table}: {found} rows for event {event_id}")
        extra = counts.keys() - wanted
        for event_id in extra:
            audit.duplicated.append(f"{table}: a row for unknown event {event_id}")
    audit.request_rows = sum(rows["request_events"].values())
    audit.usage_rows = sum(rows["usage_events"].values())
    distinct = len(set(events["usage"]))
    for table, calls in rows["rollups"].items():  # what reports over whole minutes read
        if calls < distinct:
            audit.lost.append(f"{table}: {calls} calls of {distinct} usage events")
        elif calls > distinct:
            audit.duplicated.append(f"{table}: {calls} calls for {distinct} usage events")


def warehouse_rows(settings: Settings, tag: str) -> dict[str, dict[str, int]]:
    """Rows per event id of the test's users, read by a separate process (chdb is
    in-process and single-owner; this pytest process may hold another chdb already)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.faults.warehouse_rows", settings.clickhouse_dsn, tag],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    if result.returncode != 0:
        raise AssertionError(f"reading the warehouse failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def anomaly_checkpoint(stack: FaultStack) -> tuple[dict[int, int], int] | None:
    """The anomaly agent's latest checkpoint: (next usage offset per partition, records its
    models have observed), or None before its first checkpoint."""
    from agents.anomaly.agent import AnomalyAgent
    from agents.anomaly.engine import AnomalyEngine

    agent = AnomalyAgent(stack.settings)
    checkpoint = _run(agent.load_checkpoint())
    if checkpoint is None:
        return None
    engine = AnomalyEngine.restore(checkpoint.engine, agent.prices, agent.detector_settings)
    return checkpoint.offsets, engine.stats.records


def audit_anomaly(stack: FaultStack, audit: Audit, timeout_s: float) -> None:
    """Stopped gracefully, the anomaly agent checkpoints: its offsets must be the ends of
    the usage partitions, and its models must have observed each usage event exactly once
    (a re-sent copy of an event id, from a dispatcher's spool after a crash, is one event:
    the agent keeps the first, as the spend worker and the sink do)."""
    agent = stack["anomaly"]
    stack.check_alive("anomaly")
    agent.stop(timeout_s)
    if agent.returncode() not in (0, -signal.SIGINT, 130):
        audit.lost.append(f"anomaly agent: stopped with code {agent.returncode()}")
    ends = {tp.partition: end for tp, end in stack.end_offsets("usage").items()}
    # Every distinct event id on the topic (the probe's and other users' included); the
    # topic is never truncated during a test.
    records_on_topic = len({event["event_id"] for event in stack.read("usage")})
    saved = anomaly_checkpoint(stack)
    if saved is None:
        audit.lost.append("anomaly agent: no checkpoint after a graceful stop")
        return
    offsets, observed = saved
    behind = {p: end - offsets.get(p, 0) for p, end in ends.items() if offsets.get(p, 0) != end}
    if behind:
        audit.lost.append(f"anomaly agent: checkpoint offsets short of the ends by {behind}")
    if observed < records_on_topic:
        audit.lost.append(
            f"anomaly agent: models observed {observed} of {records_on_topic} usage records"
        )
    elif observed > records_on_topic:
        audit.duplicated.append(
            f"anomaly agent: models observed {observed} records, the topic holds "
            f"{records_on_topic}: {observed - records_on_topic} seen twice"
        )


def audit_stack(
    stack: FaultStack,
    load: LoadGenerator,
    *,
    worker: bool = True,
    warehouse: bool = True,
    anomaly: bool = True,
    timeout_s: float = 240,
) -> Audit:
    audit = Audit()
    wait_for(lambda: stack.spool_depth() == 0, timeout_s, "the dispatcher's spool to drain")
    events = audit_events(stack, load.answers, audit)
    if worker:
        audit_worker(stack, events["usage"], audit, timeout_s)
    if warehouse:
        audit_warehouse(stack, events, audit, timeout_s)
    if anomaly:
        audit_anomaly(stack, audit, timeout_s)
    return audit


# -- the fault table ---------------------------------------------------------------------
@dataclass
class FaultRow:
    fault: str
    requests: int  # accepted requests (Request events) of the run
    answered: int
    lost: int
    duplicated: int
    recovery_s: float | None
    detail: str = ""
    outcome: str = "?"  # passed / failed / xfail


FAULT_ROWS: list[FaultRow] = []


def record_row(
    fault: str, audit: Audit, recovery_s: list[float] | float | None, detail: str = ""
) -> FaultRow:
    if isinstance(recovery_s, list):
        recovery = max(recovery_s) if recovery_s else None
    else:
        recovery = recovery_s
    row = FaultRow(
        fault=fault,
        requests=audit.requests,
        answered=audit.answered,
        lost=len(audit.lost),
        duplicated=len(audit.duplicated),
        recovery_s=recovery,
        detail=detail,
    )
    FAULT_ROWS.append(row)
    return row


@contextlib.contextmanager
def measured() -> Iterator[list[float]]:
    """Collects recovery times (seconds) a test appends to it."""
    times: list[float] = []
    yield times
