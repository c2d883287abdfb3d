"""``tollgate detect --kind volume`` on the Numenta Anomaly Benchmark, scored as NAB scores.

NAB (Lavin and Ahmad, ICMLA 2015; numenta/NAB, MIT) rewards a detection inside a
labelled anomaly window the more the earlier it comes, counts only the first one per
window, charges a missed window, and charges every detection outside the windows.
This module reimplements its scoring (``nab/sweeper.py`` of NAB 1.1):

- the first 15 % of each file (at most 750 rows) is the probation and not scored;
- a detection at relative position ``y`` of its window (-1 at the start, 0 at the
  end) scores ``scaledSigmoid(y) / scaledSigmoid(-1) * tp`` where
  ``scaledSigmoid(y) = 2 / (1 + e^(5y)) - 1``; only the best (first) one per window
  counts; a window without one scores ``-fn``;
- a detection outside every window scores ``scaledSigmoid(d) * fp`` where ``d`` is its
  distance past the previous window's end in that window's lengths (``-fp`` before
  any window);
- profiles: standard (tp 1, fp 0.11, fn 1), reward_low_FP_rate (fp 0.22),
  reward_low_FN_rate (fn 2);
- normalised ``100 * (S - S_null) / (S_perfect - S_null)``: the null detector (flags
  nothing) scores 0, the perfect one 100;
- a detector with a continuous score gets the threshold that maximises the raw score
  over the corpus (NAB's optimisation); binary decisions are scored as they are.

Baseline in the same run: NAB's windowed Gaussian (``nab/detectors/gaussian``: the
tail probability of each value in a Gaussian fitted to the previous 6,400 values,
refitted every 100), with its threshold optimised per profile, as NAB does. Tollgate
is run exactly as a user runs it: ``detect_csv("volume", file)``, i.e. ``tollgate
detect --kind volume FILE``; its ``is_anomaly`` column is scored as it is, and its
``score`` column with an optimised threshold too.

The corpus is split: the files in :data:`HELD_OUT` were never looked at while the
detector was developed; figures are given for the development part, the held-out
part and both. Run ``python -m bench.nab [--data DIR] [--json-out FILE]``; on a checkout
of NAB: ``--data NAB/data --windows NAB/labels/combined_windows.json`` (the files there
that are missing are left out).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.anomaly.offline import detect_csv

# The shared data directory next to the checkout (``../shared/data/anomaly``), or above it.
DEFAULT_DATA = next(
    (
        parent / "shared" / "data" / "anomaly"
        for parent in Path(__file__).resolve().parents[1:]
        if (parent / "shared" / "data" / "anomaly" / "windows.json").exists()
    ),
    Path("../shared/data/anomaly"),
)
PROFILES = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_FP_rate": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_FN_rate": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}
PROBATION = 0.15
# Set aside before any development: about a third of each family.
HELD_OUT = frozenset(
    {
        "realAdExchange/exchange-3_cpm_results.csv",
        "realAdExchange/exchange-4_cpc_results.csv",
        "realTraffic/TravelTime_451.csv",
        "realTraffic/occupancy_t4013.csv",
        "realTraffic/speed_7578.csv",
        "artificialWithAnomaly/art_daily_jumpsdown.csv",
        "artificialWithAnomaly/art_load_balancer_spikes.csv",
        "artificialNoAnomaly/art_noisy.csv",
    }
)


def scaled_sigmoid(position: float) -> float:
    if position >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


@dataclass
class Labelled:
    """One data file: its timestamps and values, and its labelled windows (row ranges)."""

    name: str
    timestamps: list[str]
    values: list[float]
    windows: list[tuple[int, int]]
    path: Path


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.strip().split(".")[0])


def load_corpus(data: Path, windows_file: Path | None = None) -> list[Labelled]:
    """The labelled files of ``data``: those ``windows_file`` (default ``data/windows.json``)
    names. With a windows file of its own (NAB's ``labels/combined_windows.json``), files it
    names that ``data`` lacks are left out, so a part of NAB can be scored."""
    windows = json.loads((windows_file or data / "windows.json").read_text())
    corpus = []
    for name in sorted(windows):
        path = data / name
        if windows_file is not None and not path.exists():
            continue
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        stamps = [row["timestamp"] for row in rows]
        index = {_parse(s): i for i, s in enumerate(stamps)}
        spans = [(index[_parse(a)], index[_parse(b)]) for a, b in windows[name]]
        corpus.append(Labelled(name, stamps, [float(r["value"]) for r in rows], spans, path))
    return corpus


# -- scoring ------------------------------------------------------------------------------


@dataclass
class Point:
    score: float
    weight: float  # the sweep score of a detection here
    window: str | None  # window name, None outside windows, "probation" not scored


def sweep_points(item: Labelled, scores: Sequence[float], profile: dict[str, float]) -> list[Point]:
    """NAB's ``Sweeper.calcSweepScore``: what a detection at each row would score."""
    n = len(scores)
    probation = min(math.floor(PROBATION * n), PROBATION * 5000)
    max_tp = scaled_sigmoid(-1.0)
    inside: dict[int, tuple[int, int, int]] = {}
    for number, (left, right) in enumerate(item.windows):
        for i in range(left, right + 1):
            inside[i] = (number, left, right)
    points = []
    previous_right: int | None = None
    previous_width = 0.0
    for i, score in enumerate(scores):
        window = inside.get(i)
        if window is not None:
            number, left, right = window
            width = float(right - left + 1)
            position = -(right - i + 1) / width
            weight = scaled_sigmoid(position) * profile["tp"] / max_tp
            name: str | None = f"{item.name}|{number}"
            if i == right:
                previous_right, previous_width = right, width
        else:
            if previous_right is None:
                distance = 3.0
            else:
                distance = abs(previous_right - i) / float(previous_width - 1)
            weight = scaled_sigmoid(distance) * profile["fp"]
            name = None
        points.append(Point(score, weight, "probation" if i < probation else name))
    return points


def best_threshold(lists: list[list[Point]], profile: dict[str, float]) -> tuple[float, float]:
    """(threshold, raw score) maximising the corpus score, NAB's ``calcScoreByThreshold``
    over all files at once. Detections are ``score >= threshold``."""
    points = sorted(
        (p for points in lists for p in points if p.window != "probation"),
        key=lambda p: p.score,
        reverse=True,
    )
    parts: dict[str, float] = {"fp": 0.0}
    for p in points:
        if p.window is not None:
            parts[p.window] = -profile["fn"]
    total = sum(parts.values())
    best = (math.inf, total)
    i = 0
    while i < len(points):
        threshold = points[i].score
        while i < len(points) and points[i].score == threshold:
            p = points[i]
            if p.window is None:
                parts["fp"] += p.weight
                total += p.weight
            elif p.weight > parts[p.window]:
                total += p.weight - parts[p.window]
                parts[p.window] = p.weight
            i += 1
        if total > best[1]:
            best = (threshold, total)
    return best


def raw_score(lists: list[list[Point]], threshold: float, profile: dict[str, float]) -> float:
    parts: dict[str, float] = {"fp": 0.0}
    for points in lists:
        for p in points:
            if p.window == "probation":
                continue
            if p.window is not None:
                parts.setdefault(p.window, -profile["fn"])
                if p.score >= threshold:
                    parts[p.window] = max(parts[p.window], p.weight)
            elif p.score >= threshold:
                parts["fp"] += p.weight
    return sum(parts.values())


def normalised(
    items: list[Labelled],
    scores: dict[str, list[float]],
    profile: dict[str, float],
    threshold: float | None,
) -> tuple[float, float]:
    """(normalised score, threshold used): optimised when ``threshold`` is None."""
    lists = [sweep_points(item, scores[item.name], profile) for item in items]
    if threshold is None:
        threshold, raw = best_threshold(lists, profile)
    else:
        raw = raw_score(lists, threshold, profile)
    null = raw_score(lists, math.inf, profile)
    perfect = profile["tp"] * sum(len(item.windows) for item in items)
    return 100.0 * (raw - null) / (perfect - null), threshold


# -- detectors ----------------------------------------------------------------------------


def windowed_gaussian(values: list[float], window: int = 6400, step: int = 100) -> list[float]:
    """NAB's windowed Gaussian: 1 - Q(|x - mean| / std) over the previous values."""
    scores = []
    data: list[float] = []
    buffer: list[float] = []
    mean, std = 0.0, 1.0

    def refit() -> tuple[float, float]:
        m = sum(data) / len(data)
        s = math.sqrt(sum((v - m) ** 2 for v in data) / len(data))
        return m, (s if s > 0 else 1e-6)

    for value in values:
        score = 0.0
        if data:
            z = abs(value - mean) / std
            score = 1.0 - 0.5 * math.erfc(z / math.sqrt(2))
        if len(data) < window:
            data.append(value)
            mean, std = refit()
        else:
            buffer.append(value)
            if len(buffer) == step:
                data = data[step:] + buffer
                buffer = []
                mean, std = refit()
        scores.append(score)
    return scores


def tollgate(item: Labelled, options: dict[str, object]) -> tuple[list[float], list[float], int]:
    """(is_anomaly as 0/1, score, out-of-order rows skipped), through ``detect_csv``."""
    out = io.StringIO()
    summary = detect_csv("volume", item.path, out, **options)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    flags = [1.0 if row["is_anomaly"] == "true" else 0.0 for row in rows]
    return flags, [float(row["score"]) for row in rows], summary.skipped


# -- running ------------------------------------------------------------------------------


def run(data: Path, options: dict[str, object], windows_file: Path | None = None) -> dict[str, Any]:
    corpus = load_corpus(data, windows_file)
    if not corpus:
        raise SystemExit(f"{data}: none of the labelled files is there")
    started = time.process_time()
    flags, scores, gauss = {}, {}, {}
    pages, skipped = {}, 0
    for item in corpus:
        flags[item.name], scores[item.name], skipped_rows = tollgate(item, options)
        pages[item.name] = int(sum(flags[item.name]))
        skipped += skipped_rows
    tollgate_seconds = time.process_time() - started
    for item in corpus:
        gauss[item.name] = windowed_gaussian(item.values)
    parts = {
        "development": [i for i in corpus if i.name not in HELD_OUT],
        "held_out": [i for i in corpus if i.name in HELD_OUT],
        "all": corpus,
    }
    results: dict[str, Any] = {}
    for part, items in parts.items():
        if not items:  # another corpus (--data) need not hold any file of HELD_OUT
            continue
        results[part] = {}
        for profile_name, profile in PROFILES.items():
            pages_score, _ = normalised(items, flags, profile, 0.5)
            optimised, threshold = normalised(items, scores, profile, None)
            baseline, base_threshold = normalised(items, gauss, profile, None)
            results[part][profile_name] = {
                "tollgate_pages": round(pages_score, 1),
                "tollgate_score_optimised": round(optimised, 1),
                "tollgate_threshold": threshold,
                "windowed_gaussian_optimised": round(baseline, 1),
                "windowed_gaussian_threshold": base_threshold,
            }
    windows = {item.name: len(item.windows) for item in corpus}
    return {
        "data": str(data),
        "files": len(corpus),
        "held_out": sorted(HELD_OUT),
        "options": {k: str(v) for k, v in options.items()},
        "results": results,
        "pages_per_file": pages,
        "windows_per_file": windows,
        "out_of_order_rows_skipped": skipped,
        "tollgate_cpu_seconds": round(tollgate_seconds, 2),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "## tollgate detect --kind volume on NAB (scored with NAB's rules)",
        "",
        f"{report['files']} files from {report['data']}; held out (never tuned on): "
        f"{len(report['held_out'])}. Normalised: null detector 0, perfect 100.",
        "",
        "| part | profile | Tollgate is_anomaly (pages, as output) | Tollgate score, optimised "
        "threshold | windowed Gaussian, optimised threshold |",
        "|---|---|--:|--:|--:|",
    ]
    for part, profiles in report["results"].items():
        for name, r in profiles.items():
            lines.append(
                f"| {part} | {name} | {r['tollgate_pages']} | {r['tollgate_score_optimised']} | "
                f"{r['windowed_gaussian_optimised']} |"
            )
    pages = report["pages_per_file"]
    lines += [
        "",
        f"Pages per file (is_anomaly rows): median {sorted(pages.values())[len(pages) // 2]}, "
        f"max {max(pages.values())}, total {sum(pages.values())} for "
        f"{sum(report['windows_per_file'].values())} labelled windows.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.nab", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB data directory")
    parser.add_argument(
        "--windows",
        type=Path,
        default=None,
        help="labelled windows (default DATA/windows.json); e.g. NAB's "
        "labels/combined_windows.json with --data NAB/data",
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    args.options = dict(item.split("=", 1) for item in args.set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.windows is None and not (args.data / "windows.json").exists():
        raise SystemExit(
            f"{args.data}: no windows.json; pass --data with NAB's data and labels, or "
            "--windows NAB/labels/combined_windows.json"
        )
    report = run(args.data, args.options, args.windows)
    print(markdown(report))
    print()
    document = json.dumps(report, indent=2)
    print(document)
    if args.json_out:
        Path(args.json_out).write_text(document + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
