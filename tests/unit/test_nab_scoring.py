"""bench/nab.py scores as NAB does: null detector 0, perfect 100, early beats late."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bench.nab import PROFILES, load_corpus, normalised, scaled_sigmoid


def corpus(tmp_path: Path) -> Path:
    start = datetime(2024, 1, 1)
    stamps = [(start + timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S") for i in range(1000)]
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.csv").write_text(
        "timestamp,value\n" + "".join(f"{s},{i % 7}\n" for i, s in enumerate(stamps))
    )
    windows = {
        "real/a.csv": [
            [stamps[400] + ".000000", stamps[449] + ".000000"],
            [stamps[800] + ".000000", stamps[849] + ".000000"],
        ]
    }
    (tmp_path / "windows.json").write_text(json.dumps(windows))
    return tmp_path


def test_null_scores_zero_perfect_one_hundred_and_earlier_is_better(tmp_path: Path) -> None:
    items = load_corpus(corpus(tmp_path))
    name = items[0].name
    standard = PROFILES["standard"]
    nothing = {name: [0.0] * 1000}
    perfect = {name: [1.0 if i in (400, 800) else 0.0 for i in range(1000)]}
    late = {name: [1.0 if i in (440, 840) else 0.0 for i in range(1000)]}
    noisy = {name: [1.0 if i in (400, 800, 100, 600) else 0.0 for i in range(1000)]}
    assert normalised(items, nothing, standard, 0.5)[0] == pytest.approx(0.0)
    assert normalised(items, perfect, standard, 0.5)[0] == pytest.approx(100.0)
    assert 0 < normalised(items, late, standard, 0.5)[0] < 100
    # two false positives cost 0.11 each (before any window) or less (after one)
    assert 90 < normalised(items, noisy, standard, 0.5)[0] < 100
    # a continuous score is thresholded at the corpus optimum
    graded = {name: [0.9 if i in (400, 800) else 0.1 for i in range(1000)]}
    score, threshold = normalised(items, graded, standard, None)
    assert score == pytest.approx(100.0) and threshold == pytest.approx(0.9)
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(0.0) == pytest.approx(0.0)


def test_a_part_of_nab_is_scored_with_nabs_own_windows_file(tmp_path: Path) -> None:
    """`--data NAB/data --windows NAB/labels/combined_windows.json` on a partial copy: the
    labelled files that are missing are left out, and a corpus without any file of the
    held-out list is scored (it used to divide by zero on the empty held-out part)."""
    from bench.nab import run

    data = corpus(tmp_path)
    labels = tmp_path / "combined_windows.json"
    windows = json.loads((data / "windows.json").read_text())
    labels.write_text(json.dumps({**windows, "realTweets/missing.csv": []}))
    (data / "windows.json").unlink()
    items = load_corpus(data, labels)
    assert [item.name for item in items] == ["real/a.csv"]
    report = run(data, {}, labels)
    assert set(report["results"]) == {"development", "all"}
    assert report["files"] == 1
