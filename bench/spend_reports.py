"""What remembering reported calls costs the spend worker: throughput and memory.

The spend worker remembers the id of every reported call (``POST /v1/usage``, ``tollgate
replay``) in a changelogged table, so a retry later than its dedupe window is charged
once (``app/budgets/counter.py``). That is one more changelog write and one more table
entry per reported call. This measures both, on real parts: a local Kafka broker and
``tollgate worker`` as its own process, against the same worker with the memory off
(``TOLLGATE_SPEND_REPORTED_IDS_MAX=0``, the baseline), interleaved in one run.

Each lane: fresh topics, a worker, a warm-up of reported records until the worker has
committed them, then ``--records`` reported records (``--users`` users, each record its own
request id) produced as fast as the producer goes. Measured: the time from the first
record sent to the worker's committed offsets reaching the end of the usage topic
(records/s), and the worker's resident memory (VmRSS) after it; the difference of RSS
between the two configurations, divided by the records, is the memory each remembered id
costs.

Run ``python -m bench.spend_reports`` (``--quick`` for a smoke run, ``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from bench.budget import _tollgate_argv
from bench.gateway import HOST, Child, clean_env, log, spawn, stop_kafka_and_temp, wait_quiet

CONFIGS = (("memory off (baseline)", "0"), ("memory on (default)", "1000000"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reported_records(count: int, users: int, tag: str) -> list[dict[str, Any]]:
    from app.metering.attribution import Identity
    from app.metering.usage import build_usage_record, reported_event_id
    from app.pricing.catalog import PriceCatalog

    prices = PriceCatalog()
    records = []
    for i in range(count):
        user = f"u{i % users}"
        request_id = f"{tag}-{i}"
        record = build_usage_record(
            prices,
            Identity(user, None, "reports", None),
            request_id=request_id,
            model="gpt-4o-mini",
            prompt_tokens=500 + i % 700,
            completion_tokens=50 + i % 300,
            source="usage_api",
        )
        record["event_id"] = reported_event_id(user, request_id)
        records.append(record)
    return records


async def produce(settings: Any, records: list[dict[str, Any]]) -> None:
    from app.events import clients
    from app.events.codec import build_codec
    from app.events.producer import usage_message

    codec = build_codec(settings.schema_registry_url)
    producer = clients.producer(settings, purpose="bench-spend-reports")
    await producer.start()
    try:
        futures = []
        for record in records:
            message = usage_message(settings, codec, record)
            futures.append(await producer.send(message.topic, message.value, key=message.key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed_and_end(settings: Any) -> tuple[int, int]:
    """The worker group's committed offsets of the usage topic, summed, and the topic's end."""
    from aiokafka import TopicPartition

    from app.events import clients

    tps = [TopicPartition(settings.topic("usage"), p) for p in range(settings.topic_partitions)]
    admin = clients.admin(settings, purpose="bench-spend-reports")
    consumer = clients.consumer(settings, purpose="bench-spend-reports", group_id=None)
    await admin.start()
    await consumer.start()
    try:
        found = await admin.list_consumer_group_offsets(
            f"{settings.topic_prefix}-spend", partitions=tps
        )
        end = await consumer.end_offsets(tps)
    finally:
        await admin.close()
        await consumer.stop()
    committed = sum(max(0, m.offset) for m in found.values())
    return committed, sum(end.values())


def wait_committed(settings: Any, worker: Child, timeout_s: float) -> float:
    """Seconds until the worker committed the whole usage topic (polled every 0.2 s)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not worker.alive():
            raise RuntimeError(f"the worker died:\n{worker.log_tail()}")
        try:
            committed, end = asyncio.run(committed_and_end(settings))
        except KafkaError:  # no group coordinator yet on a fresh broker: not committed yet
            committed, end = 0, 1
        if end and committed >= end:
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"the worker did not commit the usage topic in {timeout_s} s")


def run_lane(
    label: str, max_ids: str, args: argparse.Namespace, bootstrap: str, tmp: Path
) -> dict[str, Any]:
    from app.events.topics import ensure_topics
    from app.settings import Settings

    prefix = f"bs{uuid.uuid4().hex[:6]}"
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    asyncio.run(ensure_topics(settings))
    state_dir = tmp / f"worker-{prefix}"
    state_dir.mkdir(parents=True)
    env = clean_env(
        TOLLGATE_KAFKA_BOOTSTRAP=bootstrap,
        TOLLGATE_TOPIC_PREFIX=prefix,
        TOLLGATE_STATE_DIR=str(state_dir),
        TOLLGATE_LOG_LEVEL="WARNING",
        TOLLGATE_SPEND_REPORTED_IDS_MAX=max_ids,
    )
    worker = spawn(f"worker-{prefix}", _tollgate_argv("worker"), env, tmp)
    try:
        asyncio.run(produce(settings, reported_records(args.warmup, args.users, "warm")))
        wait_committed(settings, worker, 180)
        rss_before = rss_bytes(worker.pid)
        records = reported_records(args.records, args.users, prefix)
        started = time.monotonic()
        asyncio.run(produce(settings, records))
        produced_s = time.monotonic() - started
        counted_s = produced_s + wait_committed(settings, worker, 600)
        rss_after = rss_bytes(worker.pid)
    finally:
        if worker.alive():
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.proc.wait(10)
    result = {
        "config": label,
        "reported_ids_max": int(max_ids),
        "records": args.records,
        "produce_s": round(produced_s, 2),
        "counted_s": round(counted_s, 2),
        "records_per_s": round(args.records / counted_s, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }
    log(json.dumps(result))
    return result


def summarise(lanes: list[dict[str, Any]], records: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, _max in CONFIGS:
        mine = [lane for lane in lanes if lane["config"] == label]
        rates = sorted(lane["records_per_s"] for lane in mine)
        growth = sorted(lane["rss_after_mb"] - lane["rss_before_mb"] for lane in mine)
        out[label] = {
            "records_per_s_median": rates[len(rates) // 2],
            "records_per_s_all": rates,
            "rss_growth_mb_median": round(growth[len(growth) // 2], 1),
        }
    off, on = (out[label] for label, _max in CONFIGS)
    out["throughput_on_vs_off"] = round(on["records_per_s_median"] / off["records_per_s_median"], 3)
    extra_mb = on["rss_growth_mb_median"] - off["rss_growth_mb_median"]
    out["memory_bytes_per_remembered_id"] = round(extra_mb * 2**20 / records)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=None, help="default 100000 (quick 5000)")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kafka-port", type=int, default=39292)
    parser.add_argument("--kafka-controller-port", type=int, default=39293)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--keep-temp", action="store_true")
    args = parser.parse_args(argv)
    args.records = args.records or (5000 if args.quick else 100_000)
    args.rounds = args.rounds or (1 if args.quick else 3)

    from app.settings import Settings
    from devtools.kafka_local import LocalKafka

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-spend-reports-"))
    launcher = None
    report: dict[str, Any] = {
        "plan": {k: v for k, v in vars(args).items() if k not in ("json_out", "keep_temp")},
        "machine": {
            "cpus": os.cpu_count(),
            "other_load_before_start": wait_quiet(0 if args.quick else 30),
        },
    }
    try:
        kafka_settings = Settings(
            kafka_bootstrap=f"{HOST}:{args.kafka_port}",
            kafka_controller_port=args.kafka_controller_port,
            state_dir=tmp / "kafka-state",
        )
        launcher = LocalKafka(kafka_settings)
        launcher.start()
        lanes = []
        for round_ in range(args.rounds):
            order = CONFIGS if round_ % 2 == 0 else tuple(reversed(CONFIGS))
            for label, max_ids in order:
                log(f"round {round_ + 1}: {label}")
                lanes.append(run_lane(label, max_ids, args, kafka_settings.kafka_bootstrap, tmp))
        report["lanes"] = lanes
        report["summary"] = summarise(lanes, args.records)
    finally:
        stop_kafka_and_temp(launcher, tmp, args.keep_temp)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
