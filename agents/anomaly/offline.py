"""Offline detection: run one anomaly detector over a ``timestamp,value`` CSV.

Owns reading and validating the CSV (a ``timestamp,value`` header, or two columns with
the time first, with or without a header; commas, else tabs or semicolons; ISO-8601,
epoch-second or epoch-millisecond timestamps) and writing ``timestamp,value,score,is_anomaly`` rows, one per input row.
Rows out of time order (a block pasted out of order, a concatenated export, one
mistyped year) are not judged: they are written with ``is_anomaly=false`` and counted in
:attr:`OfflineSummary.skipped`, and the run goes on. Which rows those are is decided on
the whole file: the fewest rows whose removal leaves the rest in time order (the longest
non-decreasing run of timestamps, earlier rows kept on a tie), so one row stamped decades
ahead is the one row set aside, not every row after it. A file mostly out of order (an
export sorted newest first) is an error that says so. Rows without a value (an empty
cell, ``NaN``, ``null``, ``NA``: gaps in an export) are written unjudged too, counted in
:attr:`OfflineSummary.missing`. The detectors are
the live ones with the same settings. Backs ``tollgate detect --kind volume FILE.csv``;
it does not own the command line.

Kinds and what ``value`` means:

- ``volume``: one row per interval of any regular series (requests per minute, a
  metric, daily demand); :class:`~agents.anomaly.series.SeriesDetector` predicts it
  from its level and daily profile and pages once per event (spikes, drops, shifts).
- ``cost``: one row per request, its cost in USD (``> 0``).
- ``mix``: one row per request, ``1`` if served by the economy tier, else ``0``.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from agents.anomaly.core import Verdict
from agents.anomaly.costs import CostDetector
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.series import SeriesDetector
from app.anomaly_config import DetectorSettings

KINDS = ("volume", "cost", "mix")
SCOPE = "csv"


@dataclass(frozen=True)
class OfflineSummary:
    """What a run saw: rows written, rows flagged, rows judged while warming up, and rows
    not judged because they were out of time order."""

    rows: int
    anomalies: int
    warming_up: int
    skipped: int = 0  # out of time order
    missing: int = 0  # no value (empty, NaN, null, NA)


@dataclass(frozen=True)
class _Row:
    line: int
    timestamp_text: str
    value_text: str
    ts: datetime
    value: float
    out_of_order: bool = False
    missing: bool = False  # no value: written, not judged

    @property
    def judged(self) -> bool:
        return not (self.out_of_order or self.missing)


MISSING_VALUES = frozenset({"", "nan", "null", "na", "n/a", "none"})
EPOCH_MS_FROM = 1e11  # a number this large is epoch milliseconds: as seconds, the year 5138


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
        if abs(seconds) >= EPOCH_MS_FROM:
            seconds /= 1000  # epoch milliseconds (as seconds, after the year 5138)
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(
                f"{where}, field 'timestamp': {text!r} is out of range for epoch seconds "
                "or milliseconds"
            ) from None
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"{where}, field 'timestamp': {text!r} is neither ISO 8601 "
            "(2024-05-01T12:00:00Z) nor epoch seconds"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _read_rows(path: Path, in_order: bytearray | None = None) -> Iterator[_Row]:
    """Every row; with ``in_order`` (one flag per row with a value, from :func:`_in_time_order`)
    the rows it clears are out of time order, else none is."""
    if path.exists() and not path.is_file():  # a pipe, a device, a folder
        raise ValueError(
            f"{path}: not a regular file; detect reads its file twice (to check every row, "
            "then to judge them), so save the data to a file first"
        )
    try:
        yield from _read_text_rows(path, in_order)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None


def _delimiter(first_line: str) -> str:
    """A comma, unless the first line has none and has tabs or semicolons (a TSV, a
    spreadsheet's export in a locale whose decimal mark is a comma)."""
    if "," in first_line:
        return ","
    for candidate in ("\t", ";", "|"):
        if candidate in first_line:
            return candidate
    return ","


def _is_data_row(row: list[str]) -> bool:
    """A first row that is already a timestamp and a value (a file without a header)."""
    if len(row) < 2:
        return False
    try:
        _parse_timestamp(row[0], "")
    except ValueError:
        return False
    value = row[1].strip().lower()
    if value in MISSING_VALUES:
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def _columns(path: Path, header: list[str] | None) -> tuple[int, int, bool]:
    """Where the timestamp and the value are, and whether the first row is a header.

    A header naming ``timestamp`` and ``value`` (any case, any order, other columns
    ignored); else a first row that is already data (the first two columns); else a
    two-column header of other names (``time,count``): its first column is the time.
    """
    names = [name.strip().lower() for name in header or []]
    if "timestamp" in names and "value" in names:
        return names.index("timestamp"), names.index("value"), True
    if header and _is_data_row(header):
        return 0, 1, False
    if len(names) == 2:
        return 0, 1, True
    raise ValueError(
        f"{path}, line 1: expected a header row with the columns timestamp,value "
        "(or two columns, the time first, with or without a header); "
        f"got {','.join(header) if header else 'an empty file'}"
    )


def _read_text_rows(path: Path, in_order: bytearray | None) -> Iterator[_Row]:
    # utf-8-sig: a byte-order mark (as spreadsheets write it) is not part of the header
    with open(path, newline="", encoding="utf-8-sig") as handle:
        delimiter = _delimiter(handle.readline())
        handle.seek(0)
        reader = csv.reader(handle, delimiter=delimiter)
        starts = [1]  # the line the record being read starts on

        def records() -> Iterator[list[str]]:
            for record in reader:
                yield record
                starts[0] = reader.line_num + 1

        try:
            yield from _csv_rows(path, records(), in_order)
        except csv.Error as exc:  # e.g. a field past csv's limit: a stray quote mark
            raise ValueError(
                f"{path}, line {starts[0]}: {exc} (a quote mark that is never closed there "
                "makes the rest of the file one field: check its quoting)"
            ) from None


def _csv_rows(
    path: Path, reader: Iterator[list[str]], in_order: bytearray | None
) -> Iterator[_Row]:
    header = next(reader, None)
    ts_index, value_index, has_header = _columns(path, header)
    width = max(ts_index, value_index) + 1
    rows: Iterator[list[str]] = reader
    if not has_header and header is not None:
        rows = itertools.chain([header], reader)
    first_line = 2 if has_header else 1
    valued = 0  # rows with a value so far: the index into in_order
    for line, row in enumerate(rows, start=first_line):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{path}, line {line}"
        if len(row) < width:
            raise ValueError(f"{where}: expected at least {width} fields, got {len(row)}")
        ts = _parse_timestamp(row[ts_index], where)
        value_text = row[value_index]
        if value_text.strip().lower() in MISSING_VALUES:
            # A gap in the export: written, not judged, counted (the run goes on).
            yield _Row(line, row[ts_index], value_text, ts, math.nan, missing=True)
            continue
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"{where}, field 'value': {value_text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}, field 'value': {value_text!r} is not a finite number")
        # Out of order: written, not judged, counted (the run goes on).
        out_of_order = in_order is not None and not in_order[valued]
        valued += 1
        yield _Row(line, row[ts_index], value_text, ts, value, out_of_order=out_of_order)


def _in_time_order(stamps: array[float]) -> bytearray:
    """Which rows to judge: the longest non-decreasing subsequence of ``stamps``, earlier
    rows kept on a tie (two swapped rows: the later one is set aside, as a reader would).

    Setting aside every row earlier than the latest before it lets a single row stamped
    2051 in a 2015 series hide every row after it (probe W: 2,350 of 2,501 rows unjudged,
    no anomaly). Patience sorting over the rows in reverse order with negated times finds
    the longest run and, on a tie, the one that keeps earlier rows; O(n log n), 17 bytes
    a row."""
    n = len(stamps)
    keep = bytearray(n)
    tails: array[float] = array("d")  # -time of the last row of the best run of each length
    tail_at = array("q")  # which row that is
    before = array("q", bytes(8 * n))  # the next row (in file order) of a row's best run
    for i in range(n - 1, -1, -1):
        key = -stamps[i]
        length = bisect.bisect_right(tails, key)
        before[i] = tail_at[length - 1] if length else -1
        if length == len(tails):
            tails.append(key)
            tail_at.append(i)
        else:
            tails[length] = key
            tail_at[length] = i
    i = tail_at[-1] if tail_at else -1
    while i >= 0:
        keep[i] = 1
        i = before[i]
    return keep


@dataclass
class _Scan:
    """What the first pass over a file learned: every row checked, and what the detector
    needs before the first row (a volume series' spacing, its length)."""

    rows: int = 0
    judged: int = 0
    skipped: int = 0
    missing: int = 0
    gaps: array[float] = field(default_factory=lambda: array("d"))
    in_order: bytearray = field(default_factory=bytearray)

    @property
    def interval(self) -> float:
        """The series' usual spacing in seconds: the median positive gap (60 if none)."""
        positive = sorted(gap for gap in self.gaps if gap > 0)
        return positive[len(positive) // 2] if positive else 60.0


#: A file with more rows than this share out of time order is refused, not judged in part.
MOSTLY_OUT_OF_ORDER = 0.5


def _scan(kind: str, path: Path) -> _Scan:
    """Read the whole file once, raising at its first bad row (nothing is written then).

    A value a kind cannot take (a cost of 0, a share of 0.5) is refused wherever its row
    is, out of time order or not."""
    scan = _Scan()
    stamps: array[float] = array("d")
    lines = array("q")
    for row in _read_rows(path):
        scan.rows += 1
        if row.missing:
            scan.missing += 1
            continue
        if kind == "cost" and row.value <= 0:
            raise ValueError(
                f"{path}, line {row.line}, field 'value': a request's cost must be > 0 USD"
            )
        if kind == "mix" and row.value not in (0.0, 1.0):
            raise ValueError(
                f"{path}, line {row.line}, field 'value': {row.value_text!r} must be 1 "
                "(economy tier) or 0 (other tiers)"
            )
        stamps.append(row.ts.timestamp())
        lines.append(row.line)
    scan.in_order = _in_time_order(stamps)
    scan.judged = sum(scan.in_order)
    scan.skipped = len(stamps) - scan.judged
    if len(stamps) >= 4 and scan.skipped > MOSTLY_OUT_OF_ORDER * len(stamps):
        first = next(lines[i] for i in range(len(stamps)) if not scan.in_order[i])
        raise ValueError(
            f"{path}: {scan.skipped} of {len(stamps)} rows are out of time order (the first "
            f"at line {first}); is the file sorted newest first? Sort it oldest first"
        )
    if kind == "volume":
        previous: float | None = None
        for stamp, kept in zip(stamps, scan.in_order, strict=True):
            if kept:
                if previous is not None:
                    scan.gaps.append(stamp - previous)
                previous = stamp
    return scan


def _volume_judge(settings: DetectorSettings, scan: _Scan) -> Callable[[_Row], Verdict]:
    detector = SeriesDetector(SCOPE, settings, scan.interval, total_points=scan.judged)
    return lambda row: detector.observe(row.ts, row.value)


def _cost_judge(settings: DetectorSettings, scan: _Scan) -> Callable[[_Row], Verdict]:
    detector = CostDetector(SCOPE, settings, own_reference=True)
    return lambda row: (
        detector.observe(row.ts, row.value * 1e9) or _quiet(row, "cost_per_request", "usd")
    )


def _mix_judge(settings: DetectorSettings, scan: _Scan) -> Callable[[_Row], Verdict]:
    detector = TierMixDetector(SCOPE, settings)
    return lambda row: (
        detector.observe(row.ts, row.value == 1.0) or _quiet(row, "tier_mix", "share")
    )


def _quiet(row: _Row, kind: str, unit: str) -> Verdict:
    return Verdict(
        kind=kind,  # type: ignore[arg-type]
        scope=SCOPE,
        ts=row.ts,
        score=0.0,
        is_anomaly=False,
        expected=None,
        observed=row.value,
        unit=unit,
        metric=kind,
        window_seconds=None,
    )


_JUDGES: dict[str, Callable[[DetectorSettings, _Scan], Callable[[_Row], Verdict]]] = {
    "volume": _volume_judge,
    "cost": _cost_judge,
    "mix": _mix_judge,
}


def detect_csv(
    kind: str, in_path: str | Path, out_stream: TextIO, **detector_options: object
) -> OfflineSummary:
    """Judge every row of ``in_path`` and write ``timestamp,value,score,is_anomaly`` rows.

    ``detector_options`` override :class:`DetectorSettings` fields by name, e.g.
    ``series_threshold=12``. Raises ``ValueError`` naming the line and field of bad
    input, an unknown kind, or an unknown option; nothing is written in that case.
    Out-of-order rows are not an error: see the module docstring.

    The file is read twice: once to check every row (and learn a series' spacing), then
    row by row, each judged and written as it is read. Holding every row and its verdict
    took about 730 bytes a row, 1.45 GB for 2 million (session 17's probe).
    """
    if kind not in _JUDGES:
        raise ValueError(f"unknown detector kind {kind!r}; use one of {', '.join(KINDS)}")
    settings = DetectorSettings.with_options(**detector_options)
    path = Path(in_path)
    scan = _scan(kind, path)
    judge = _JUDGES[kind](settings, scan)
    writer = csv.writer(out_stream, lineterminator="\n")
    writer.writerow(["timestamp", "value", "score", "is_anomaly"])
    anomalies = warming = 0
    for row in _read_rows(path, scan.in_order):
        if not row.judged:
            writer.writerow([row.timestamp_text, row.value_text, "0", "false"])
            continue
        verdict = judge(row)
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
    return OfflineSummary(
        rows=scan.rows,
        anomalies=anomalies,
        warming_up=warming,
        skipped=scan.skipped,
        missing=scan.missing,
    )
