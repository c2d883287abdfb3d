"""Tests of app.events.spool on real files in tmp_path (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from app.events.spool import (
    CURSOR_FILE,
    HEADER_SIZE,
    MAGIC,
    Spool,
    SpoolCorruptError,
    SpooledRecord,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
    segment_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOPIC = "tollgate.usage"


def value_of(i: int, size: int = 40) -> bytes:
    return (f"v{i}:".encode() * size)[:size]


def key_of(i: int) -> bytes | None:
    return None if i % 3 == 0 else f"k{i}".encode()


def record_size(topic: str, key: bytes | None, value: bytes) -> int:
    return HEADER_SIZE + len(topic.encode()) + (len(key) if key is not None else 0) + len(value)


def fill(spool: Spool, n: int, start: int = 1, size: int = 40) -> list[int]:
    return [
        spool.append(TOPIC, key_of(i), value_of(i, size), 1_700_000_000_000 + i)
        for i in range(start, start + n)
    ]


def expected(i: int, size: int = 40) -> SpooledRecord:
    return SpooledRecord(i, TOPIC, key_of(i), value_of(i, size), 1_700_000_000_000 + i)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.log"))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_append_peek_ack_in_order_across_segment_rollover(tmp_path: Path, fsync: str) -> None:
    with Spool(tmp_path, fsync=fsync, segment_bytes=300) as spool:  # type: ignore[arg-type]
        assert spool.depth == 0 and spool.size_bytes == 0 and spool.peek(10) == []
        assert fill(spool, 20) == list(range(1, 21))
        assert len(segments(tmp_path)) > 3
        assert spool.depth == 20
        assert spool.size_bytes == sum(p.stat().st_size for p in segments(tmp_path))

        assert spool.peek(100) == [expected(i) for i in range(1, 21)]
        assert spool.peek(5) == [expected(i) for i in range(1, 6)]
        assert spool.peek(5) == [expected(i) for i in range(1, 6)]  # peek removes nothing
        assert spool.peek(0) == []

        spool.ack(5)
        assert spool.depth == 15
        assert [r.seq for r in spool.peek(3)] == [6, 7, 8]
        spool.ack(3)  # an older ack is a no-op
        assert [r.seq for r in spool.peek(1)] == [6]
        spool.ack(20)
        assert spool.depth == 0 and spool.peek(10) == []
        assert spool.size_bytes == 0 and segments(tmp_path) == []
        assert spool.append(TOPIC, None, b"x", 1) == 21
        assert spool.peek(10) == [SpooledRecord(21, TOPIC, None, b"x", 1)]


def test_append_many_is_one_batch_with_consecutive_seqs(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=250) as spool:
        fill(spool, 2)
        batch = [(TOPIC, key_of(i), value_of(i), 1_700_000_000_000 + i) for i in range(3, 13)]
        assert spool.append_many(batch) == list(range(3, 13))
        assert spool.append_many([]) == []
        assert spool.peek(50) == [expected(i) for i in range(1, 13)]
        # a record larger than segment_bytes gets a segment of its own
        big = spool.append("other", b"", b"B" * 1000, 5)
        assert spool.peek(50)[-1] == SpooledRecord(big, "other", b"", b"B" * 1000, 5)
        assert segments(tmp_path)[-1].name == segment_name(big)


def test_restart_keeps_unacked_records_and_seq_counter(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 12)
        spool.ack(4)
    with Spool(tmp_path, segment_bytes=300) as spool:
        assert spool.depth == 8
        assert spool.peek(100) == [expected(i) for i in range(5, 13)]
        assert fill(spool, 2, start=13) == [13, 14]
    with Spool(tmp_path, segment_bytes=300) as spool:
        assert spool.peek(100) == [expected(i) for i in range(5, 15)]
        spool.ack(14)
    assert segments(tmp_path) == []
    assert (tmp_path / CURSOR_FILE).read_text() == "14\n"
    # with every segment deleted, the cursor alone carries the seq counter
    with Spool(tmp_path) as spool:
        assert spool.depth == 0
        assert spool.append(TOPIC, None, b"again", 0) == 15


def test_fully_acked_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 20)
        before = segments(tmp_path)
        first_seqs = [int(p.name[6:26]) for p in before]
        cut = first_seqs[2] + 1  # inside the third segment
        spool.ack(cut)
        after = segments(tmp_path)
        assert after == before[2:]
        assert spool.size_bytes == sum(p.stat().st_size for p in after)
        assert spool.peek(1)[0].seq == cut + 1
        assert (tmp_path / CURSOR_FILE).read_text() == f"{cut}\n"


@pytest.mark.parametrize("cut", [1, 7, 30])
def test_torn_tail_is_truncated_on_reopen(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 9)
    last = segments(tmp_path)[-1]
    size = last.stat().st_size
    os.truncate(last, size - cut)
    with caplog.at_level(logging.WARNING, logger="app.events.spool"), Spool(tmp_path) as spool:
        assert spool.peek(100) == [expected(i) for i in range(1, 9)]
        assert "torn tail" in caplog.text and str(last) in caplog.text
        assert spool.append(TOPIC, None, b"after", 1) == 9
    with Spool(tmp_path) as spool:
        assert spool.peek(100)[-1] == SpooledRecord(9, TOPIC, None, b"after", 1)
        assert spool.depth == 9


def test_torn_tail_warning_says_bytes_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 3)
    last = segments(tmp_path)[-1]
    with last.open("ab") as f:
        f.write(b"\x00" * 13)
    with caplog.at_level(logging.WARNING, logger="app.events.spool"), Spool(tmp_path) as spool:
        assert spool.depth == 3
    assert "dropped 13 bytes" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 100,
        bytes(range(256)) * 3,
        MAGIC + b"\x01\x02\x03",  # a header cut short
        MAGIC + b"\xff" * 200,  # a full-length header with nonsense in it
    ],
)
def test_garbage_tail_is_truncated_and_earlier_records_survive(
    tmp_path: Path, garbage: bytes
) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 5)
    last = segments(tmp_path)[-1]
    good_size = last.stat().st_size
    with last.open("ab") as f:
        f.write(garbage)
    with Spool(tmp_path) as spool:
        assert spool.peek(10) == [expected(i) for i in range(1, 6)]
        assert last.stat().st_size == good_size
        assert spool.size_bytes == good_size


def test_an_unwritten_last_segment_is_dropped(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 3)
    (tmp_path / segment_name(4)).touch()  # crash right after creating the next segment
    with Spool(tmp_path) as spool:
        assert spool.depth == 3
        assert spool.append(TOPIC, None, b"x", 0) == 4
        assert spool.peek(10)[-1].value == b"x"


def test_corrupt_middle_record_raises_and_modifies_nothing(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 5)
    (seg,) = segments(tmp_path)
    offset3 = sum(record_size(TOPIC, key_of(i), value_of(i)) for i in (1, 2))
    flip_byte(seg, offset3 + HEADER_SIZE + 12)  # inside record 3's body
    content = seg.read_bytes()
    with pytest.raises(SpoolCorruptError) as err:
        Spool(tmp_path)
    assert err.value.path == seg and err.value.offset == offset3
    assert str(seg) in str(err.value) and f"offset {offset3}" in str(err.value)
    assert seg.read_bytes() == content
    # the directory lock was released: a fixed spool can be opened
    flip_byte(seg, offset3 + HEADER_SIZE + 12)
    with Spool(tmp_path) as spool:
        assert spool.depth == 5


def test_corrupt_last_record_of_an_older_segment_raises(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 20)
    first = segments(tmp_path)[0]
    flip_byte(first, first.stat().st_size - 1)  # would look like a torn tail if it were last
    with pytest.raises(SpoolCorruptError) as err:
        Spool(tmp_path, segment_bytes=300)
    assert err.value.path == first


def test_missing_segment_raises(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 20)
    segments(tmp_path)[1].unlink()
    with pytest.raises(SpoolCorruptError, match="records are missing"):
        Spool(tmp_path)


def test_corruption_after_open_is_caught_by_peek(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 3)
        (seg,) = segments(tmp_path)
        flip_byte(seg, seg.stat().st_size - 2)
        assert len(spool.peek(2)) == 2
        with pytest.raises(SpoolCorruptError):
            spool.peek(3)


def test_full_spool_raises_and_acking_frees_space(tmp_path: Path) -> None:
    value = b"v" * 500
    rec = record_size(TOPIC, b"k", value)

    def add(n: int) -> list[int]:
        return [spool.append(TOPIC, b"k", value, 0) for _ in range(n)]

    with Spool(tmp_path, max_bytes=4 * rec + 10, segment_bytes=2 * rec) as spool:
        add(4)
        assert spool.size_bytes == 4 * rec
        with pytest.raises(SpoolFullError) as err:
            add(1)
        message = str(err.value)
        assert str(tmp_path) in message
        assert f"max_bytes={4 * rec + 10}" in message
        assert "TOLLGATE_SPOOL_MAX_BYTES" in message
        # append_many is all-or-nothing
        with pytest.raises(SpoolFullError):
            spool.append_many([(TOPIC, None, b"small", 0), (TOPIC, None, b"x" * 500, 0)])
        assert spool.depth == 4
        spool.ack(1)  # the first segment still holds record 2: nothing freed
        with pytest.raises(SpoolFullError):
            add(1)
        spool.ack(2)  # first segment deleted
        assert spool.size_bytes == 2 * rec
        assert add(2) == [5, 6]
        with pytest.raises(SpoolFullError):
            add(1)
        assert [r.seq for r in spool.peek(10)] == [3, 4, 5, 6]


def test_cursor_ahead_of_data_after_power_loss(tmp_path: Path) -> None:
    """The cursor was made durable but the segment's unsynced tail was lost."""
    with Spool(tmp_path) as spool:
        fill(spool, 10)
    (tmp_path / CURSOR_FILE).write_text("12\n")
    with Spool(tmp_path) as spool:
        assert spool.depth == 0 and segments(tmp_path) == []
        assert spool.append(TOPIC, None, b"x", 0) == 13


def test_unreadable_cursor_redelivers_rather_than_loses(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 4)
        spool.ack(2)
    (tmp_path / CURSOR_FILE).write_bytes(b"")
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.peek(10)] == [1, 2, 3, 4]


def test_ack_validation_and_closed_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 3)
    with pytest.raises(ValueError, match="last seq is 3"):
        spool.ack(4)
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(TOPIC, None, b"x", 0)
    with pytest.raises(ValueError):
        Spool(tmp_path, fsync="sometimes")  # type: ignore[arg-type]
    with Spool(tmp_path) as spool, pytest.raises(TypeError):
        spool.append(TOPIC, None, "text", 0)  # type: ignore[arg-type]


def test_one_spool_per_directory(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    with Spool(tmp_path) as spool:  # released on close
        assert spool.depth == 0


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    results: list[list[int]] = []
    with Spool(tmp_path, segment_bytes=2000) as spool:

        def worker(t: int) -> None:
            results.append([spool.append(f"t{t}", None, b"%d" % i, i) for i in range(200)])

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        seqs = sorted(s for r in results for s in r)
        assert seqs == list(range(1, 801))
        records = spool.peek(1000)
        assert [r.seq for r in records] == seqs
        for t in range(4):  # each thread's records keep their own order
            assert [r.value for r in records if r.topic == f"t{t}"] == [
                b"%d" % i for i in range(200)
            ]


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from app.events.spool import Spool

    spool = Spool(Path(sys.argv[1]), fsync="batch", segment_bytes=16 * 1024)
    i = 0
    while True:
        seq = spool.append("t", b"k%d" % i, b"%d:" % i * 60, i)
        sys.stdout.write(f"{seq} {i}\\n")
        sys.stdout.flush()
        i += 1
    """
)


def test_sigkill_mid_append_loses_no_returned_record(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    lines: list[bytes] = []
    try:
        for _ in range(400):
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"child died: {child.stderr.read().decode()}")
            lines.append(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    # the lines read plus what is left in the pipe; only complete lines count
    lines += child.stdout.read().split(b"\n")[:-1]
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    printed = [tuple(map(int, line.split())) for line in lines]
    last_printed = printed[-1][0]

    with Spool(tmp_path) as spool:
        records = spool.peek(1_000_000)
    seqs = [r.seq for r in records]
    assert seqs == list(range(1, len(seqs) + 1))
    # the one append that may have returned without being printed, at most
    assert last_printed <= len(seqs) <= last_printed + 1
    for r in records:
        i = r.seq - 1
        assert (r.topic, r.key, r.value, r.timestamp_ms) == ("t", b"k%d" % i, b"%d:" % i * 60, i)
    for seq, i in printed:
        assert seq == i + 1


FAILING_WRITE_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from app.events.spool import Spool

    # A real short write + EFBIG: cap this process's file size mid-record.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    spool = Spool(Path(sys.argv[1]), fsync="never")
    n = 0
    try:
        while True:
            spool.append("t", None, b"%05d" % n * 60, n)
            n += 1
    except OSError as exc:
        error = exc.__class__.__name__
    depth_after_error = spool.depth
    size_after_error = spool.size_bytes
    small_seq = spool.append("t", None, b"small", -1)
    spool.close()
    with Spool(Path(sys.argv[1])) as spool:
        records = spool.peek(1000)
    print(json.dumps({
        "n": n, "error": error, "depth_after_error": depth_after_error,
        "size_after_error": size_after_error, "small_seq": small_seq,
        "values": [r.value.decode() for r in records],
    }))
    """
)


def test_failed_write_is_undone_and_the_spool_stays_usable(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE_CHILD, str(tmp_path)],
        capture_output=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    n = result["n"]
    record = HEADER_SIZE + 1 + 300
    assert n == 20_000 // record  # the record that crossed the limit failed
    assert result["depth_after_error"] == n
    assert result["size_after_error"] == n * record  # the partial write was cut off
    assert result["small_seq"] == n + 1  # the failed append consumed no seq
    assert result["values"] == [f"{i:05d}" * 60 for i in range(n)] + ["small"]
    assert b"torn tail" not in done.stderr
