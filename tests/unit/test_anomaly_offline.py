"""Offline detection over a timestamp,value CSV: round trip and input errors."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agents.anomaly.offline import detect_csv

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def write(path: Path, rows: list[tuple[str, str]], header: str = "timestamp,value") -> Path:
    path.write_text(header + "\n" + "".join(f"{ts},{value}\n" for ts, value in rows))
    return path


def counts_csv(path: Path, epoch: bool = False, spike_at: int = 150) -> Path:
    rng = random.Random(1)
    rows = []
    for m in range(200):
        ts = T0 + timedelta(minutes=m)
        value = 400 if m == spike_at else round(rng.gauss(60, 8))
        rows.append((str(int(ts.timestamp())) if epoch else ts.isoformat(), str(value)))
    return write(path, rows)


def read(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_volume_round_trip_flags_the_spike_only(tmp_path: Path) -> None:
    source = counts_csv(tmp_path / "requests.csv")
    out = io.StringIO()
    summary = detect_csv("volume", source, out)
    rows = read(out.getvalue())
    assert list(rows[0]) == ["timestamp", "value", "score", "is_anomaly"]
    assert summary.rows == len(rows) == 200
    flagged = [i for i, row in enumerate(rows) if row["is_anomaly"] == "true"]
    assert flagged == [150]
    assert rows[150]["timestamp"] == (T0 + timedelta(minutes=150)).isoformat()
    assert rows[150]["value"] == "400" and float(rows[150]["score"]) > 5
    assert summary.anomalies == 1 and summary.warming_up == 30


def test_epoch_seconds_and_detector_options(tmp_path: Path) -> None:
    source = counts_csv(tmp_path / "epoch.csv", epoch=True, spike_at=10)
    out = io.StringIO()
    summary = detect_csv("volume", source, out, volume_warmup_minutes=5)
    assert summary.warming_up == 5
    assert read(out.getvalue())[10]["is_anomaly"] == "true"


def test_cost_and_mix_kinds(tmp_path: Path) -> None:
    rng = random.Random(2)
    costs = [
        (str(1_700_000_000 + i), f"{0.002 * rng.lognormvariate(0, 0.5):.6f}") for i in range(400)
    ]
    costs += [(str(1_700_000_400 + i), "0.2") for i in range(40)]
    out = io.StringIO()
    assert detect_csv("cost", write(tmp_path / "cost.csv", costs), out).anomalies > 0
    assert not any(row["is_anomaly"] == "true" for row in read(out.getvalue())[:400])

    shares = [(str(1_700_000_000 + i), "1" if rng.random() < 0.7 else "0") for i in range(3000)]
    shares += [(str(1_700_003_000 + i), "1" if rng.random() < 0.1 else "0") for i in range(100)]
    out = io.StringIO()
    assert detect_csv("mix", write(tmp_path / "mix.csv", shares), out).anomalies > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time,count\n2024-05-01T00:00:00Z,3\n", r"line 1: expected a header row"),
        ("", r"line 1: expected a header row.*empty file"),
        (
            "timestamp,value\n2024-05-01T00:00:00Z,3\n2024-05-01T00:01:00Z,lots\n",
            r"line 3, field 'value'",
        ),
        ("timestamp,value\nyesterday,3\n", r"line 2, field 'timestamp'.*ISO 8601"),
        (
            "timestamp,value\n2024-05-01T00:01:00Z,3\n2024-05-01T00:00:00Z,4\n",
            r"line 3.*sort the file",
        ),
        (
            "timestamp,value\n2024-05-01T00:00:00Z,-3\n",
            r"line 2, field 'value': volume must be >= 0",
        ),
        ("timestamp,value\n2024-05-01T00:00:00Z,nan\n", r"line 2, field 'value'.*finite"),
        ("timestamp,value\n2024-05-01T00:00:00Z\n", r"line 2: expected 2 fields"),
    ],
)
def test_bad_input_names_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    source = tmp_path / "bad.csv"
    source.write_text(content)
    out = io.StringIO()
    with pytest.raises(ValueError, match=message):
        detect_csv("volume", source, out)
    assert out.getvalue() == ""  # nothing half-written


def test_unknown_kind_and_option(tmp_path: Path) -> None:
    source = counts_csv(tmp_path / "ok.csv")
    with pytest.raises(ValueError, match="unknown detector kind 'spend'; use one of volume"):
        detect_csv("spend", source, io.StringIO())
    with pytest.raises(ValueError, match="unknown detector option"):
        detect_csv("volume", source, io.StringIO(), warmup=3)
    bad_mix = write(tmp_path / "mix.csv", [("1700000000", "0.5")])
    with pytest.raises(ValueError, match="must be 1 \\(economy tier\\) or 0"):
        detect_csv("mix", bad_mix, io.StringIO())
