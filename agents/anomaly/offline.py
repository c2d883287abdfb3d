"""Offline detection: run one anomaly detector over a ``timestamp,value`` CSV.

Owns reading and validating the CSV (header row required; ISO-8601 or epoch-second
timestamps in time order) and writing ``timestamp,value,score,is_anomaly`` rows.
The detectors are the live ones (:mod:`agents.anomaly.detectors`) with the same
settings, so a past series can be checked the way the engine would have judged it.
Backs ``tollgate detect --kind volume FILE.csv``; it does not own the command line.

Kinds and what ``value`` means:

- ``volume``: one row per interval (e.g. requests per minute), ``>= 0``. Integer
  values are treated as counts (Poisson floor, ``volume_min_request_excess``);
  other values as amounts. Spikes and drops are both reported.
- ``cost``: one row per request, its cost in USD (``> 0``).
- ``mix``: one row per request, ``1`` if served by the economy tier, else ``0``.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from agents.anomaly.detectors import (
    CostDetector,
    DetectorSettings,
    Point,
    TierMixDetector,
    Verdict,
    VolumeDetector,
)

KINDS = ("volume", "cost", "mix")
SCOPE = "csv"


@dataclass(frozen=True)
class OfflineSummary:
    """What a run saw: rows judged, rows flagged, and rows judged while warming up."""

    rows: int
    anomalies: int
    warming_up: int


@dataclass(frozen=True)
class _Row:
    line: int
    timestamp_text: str
    value_text: str
    ts: datetime
    value: float


def _parse_timestamp(text: str, where: str) -> datetime:
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{where}, field 'timestamp': empty; use ISO 8601 or epoch seconds")
    try:
        seconds = float(stripped)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"{where}, field 'timestamp': {text!r} is not a finite number")
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"{where}, field 'timestamp': {text!r} is neither ISO 8601 "
            "(2024-05-01T12:00:00Z) nor epoch seconds"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _read_rows(path: Path) -> Iterator[_Row]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        names = [name.strip().lower() for name in header or []]
        if "timestamp" not in names or "value" not in names:
            raise ValueError(
                f"{path}, line 1: expected a header row with the columns timestamp,value; "
                f"got {','.join(header) if header else 'an empty file'}"
            )
        ts_index, value_index = names.index("timestamp"), names.index("value")
        previous: datetime | None = None
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path}, line {line}"
            if len(row) <= max(ts_index, value_index):
                raise ValueError(f"{where}: expected {len(names)} fields, got {len(row)}")
            ts = _parse_timestamp(row[ts_index], where)
            value_text = row[value_index]
            try:
                value = float(value_text)
            except ValueError:
                raise ValueError(
                    f"{where}, field 'value': {value_text!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise ValueError(f"{where}, field 'value': {value_text!r} is not a finite number")
            if previous is not None and ts < previous:
                raise ValueError(
                    f"{where}, field 'timestamp': {row[ts_index]!r} is earlier than the row "
                    "before; sort the file by time"
                )
            previous = ts
            yield _Row(line, row[ts_index], value_text, ts, value)


def _judge_volume(
    rows: list[_Row], settings: DetectorSettings, path: Path
) -> Iterator[tuple[_Row, Verdict]]:
    for row in rows:
        if row.value < 0:
            raise ValueError(f"{path}, line {row.line}, field 'value': volume must be >= 0")
    counts = all(row.value == int(row.value) for row in rows)
    spacing = [
        (later.ts - earlier.ts).total_seconds() for earlier, later in itertools.pairwise(rows)
    ]
    interval = int(sorted(spacing)[len(spacing) // 2]) if spacing else 60
    detector = VolumeDetector(
        SCOPE,
        settings,
        metric="requests" if counts else "value",
        detect_drops=True,
        interval_seconds=max(interval, 1),
    )
    for row in rows:
        yield row, detector.observe(Point(row.ts, row.value))


def _judge_cost(
    rows: list[_Row], settings: DetectorSettings, path: Path
) -> Iterator[tuple[_Row, Verdict]]:
    detector = CostDetector(SCOPE, settings)
    for row in rows:
        if row.value <= 0:
            raise ValueError(
                f"{path}, line {row.line}, field 'value': a request's cost must be > 0 USD"
            )
        yield row, detector.observe(Point(row.ts, row.value * 1e9))


def _judge_mix(
    rows: list[_Row], settings: DetectorSettings, path: Path
) -> Iterator[tuple[_Row, Verdict]]:
    detector = TierMixDetector(SCOPE, settings)
    for row in rows:
        if row.value not in (0.0, 1.0):
            raise ValueError(
                f"{path}, line {row.line}, field 'value': {row.value_text!r} must be 1 "
                "(economy tier) or 0 (other tiers)"
            )
        yield row, detector.observe(Point(row.ts, row.value))


_JUDGES: dict[
    str, Callable[[list[_Row], DetectorSettings, Path], Iterator[tuple[_Row, Verdict]]]
] = {
    "volume": _judge_volume,
    "cost": _judge_cost,
    "mix": _judge_mix,
}


def detect_csv(
    kind: str, in_path: str | Path, out_stream: TextIO, **detector_options: object
) -> OfflineSummary:
    """Judge every row of ``in_path`` and write ``timestamp,value,score,is_anomaly`` rows.

    ``detector_options`` override :class:`DetectorSettings` fields by name, e.g.
    ``volume_p_value=1e-4``. Raises ``ValueError`` naming the line and field of bad
    input, an unknown kind, or an unknown option; nothing is written in that case.
    """
    if kind not in _JUDGES:
        raise ValueError(f"unknown detector kind {kind!r}; use one of {', '.join(KINDS)}")
    settings = DetectorSettings.with_options(**detector_options)
    path = Path(in_path)
    rows = list(_read_rows(path))
    results = list(_JUDGES[kind](rows, settings, path))  # validate everything before writing
    writer = csv.writer(out_stream, lineterminator="\n")
    writer.writerow(["timestamp", "value", "score", "is_anomaly"])
    anomalies = warming = 0
    for row, verdict in results:
        anomalies += verdict.is_anomaly
        warming += verdict.warming_up
        writer.writerow(
            [
                row.timestamp_text,
                row.value_text,
                f"{verdict.score:.6g}",
                "true" if verdict.is_anomaly else "false",
            ]
        )
    return OfflineSummary(rows=len(results), anomalies=anomalies, warming_up=warming)
