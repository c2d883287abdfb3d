"""The spool: Tollgate's append-only on-disk store for usage events Kafka could not take.

When the broker is unreachable or a send fails, the dispatcher appends the already
Avro-encoded events here and keeps serving. When the broker is back it replays them
**in order**: ``peek`` the oldest un-acked records, produce them, then ``ack`` up to the
last seq the broker confirmed. Nothing is removed before it is acked.

Delivery contract
=================
At-least-once. A crash between "the broker acked the send" and ``Spool.ack`` re-sends
those records after restart; downstream de-duplicates by the ``event_id`` inside the
Avro value. No record whose ``append`` returned is ever dropped silently, and no record
is ever half-written or half-read: every record carries its length and a CRC32.

Durability: the ``fsync`` policy
================================
``append`` always hands the bytes to the kernel with ``os.write`` before it returns (no
user-space buffer), so **a process crash (SIGKILL, OOM kill, segfault) loses nothing**
under any policy: the data is in the page cache and reaches the disk anyway. The policy
only decides what survives a **power loss or kernel crash**:

``"always"``
    ``fdatasync`` after every ``append`` / ``append_many`` call, before it returns.
    Safest and slowest: a returned seq is on stable storage.
``"batch"`` (default)
    ``fdatasync`` on ``flush()``, on ``close()``, when a segment is sealed, and from a
    background thread at most 100 ms (``BATCH_FSYNC_INTERVAL_S``) after the first
    not-yet-synced append. A power loss can lose the appends of the last <= 100 ms
    (plus the duration of one ``fdatasync``); a process crash loses nothing.
``"never"``
    The OS decides when to write back (Linux: typically within ~30 s). For tests,
    tmpfs, or disks whose loss is acceptable. Explicit ``flush()`` still syncs.

The ack cursor (``ack.cursor``) is replaced atomically (write a temp file, ``os.replace``)
on every ``ack``; it is fsynced on every ``ack`` under "always", and under "batch" and
"never" on ``flush()``/``close()`` and always *before* a fully-acked segment file is
deleted, so a deleted segment can never look like lost data. (Under "batch" an fsync per
Kafka acknowledgement would stall the dispatcher's event loop for milliseconds.)
Losing an ack only means re-sending (at-least-once), never losing records.

On-disk format
==============
The directory holds segment files ``spool-<first_seq:020d>.log``, the cursor
``ack.cursor`` (decimal last acked seq + newline) and ``spool.lock`` (an exclusive
``flock``: one ``Spool`` per directory, across processes). A segment rolls over when the
next record would push it past ``segment_bytes`` (a single larger record gets a segment
of its own). Each record is a 34-byte little-endian header followed by the body::

    magic  b"TGS\\x01"   4 bytes
    crc32               u32   CRC32 over the body, continued over header bytes 8..34
    body_len            u32   len(topic) + len(key) + len(value)
    seq                 u64   1, 2, 3, ... consecutive for the spool's whole life
    timestamp_ms        i64
    topic_len           u16   UTF-8 bytes
    key_len             i32   -1 for a ``None`` key
    body                topic + key + value

Seqs survive restarts (they continue after the highest seq on disk or in the cursor).
The one exception: a record lost with a torn tail (below) never got durable, and its
seq is handed out again.

Recovery on open
================
Every un-acked segment is scanned and every CRC checked; the in-memory index built from
it (one 8-byte offset per un-acked record) makes ``peek`` O(records read), no rescans.

* A torn or garbage tail in the **last** segment (the expected result of a crash during
  a write) is truncated, with a warning giving the number of bytes dropped.
* Anything else - a bad record with a valid record after it, a bad record in an older
  segment, a seq out of order, a missing segment - raises ``SpoolCorruptError`` naming
  the file and byte offset, and nothing is modified: the operator decides (e.g. move the
  file away and replay it by hand). Under "never" a power loss can produce this.
* Fully-acked segments left over from a crash are deleted.

Capacity
========
``append`` raises ``SpoolFullError`` when the un-acked segments plus the new records
would exceed ``max_bytes`` (setting ``TOLLGATE_SPOOL_MAX_BYTES``); ``append_many`` is
all-or-nothing. Space is freed when a segment becomes fully acked and is deleted, so
``segment_bytes`` should be well below ``max_bytes``.

Threading
=========
All methods are synchronous file I/O, meant to be called directly from the asyncio
producer (they are short: one ``write`` per call; under "always" also one
``fdatasync``). A single ``threading.Lock`` serialises them, so a ``Spool`` may also be
shared between threads. POSIX only (``flock``, ``pread``).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

__all__ = [
    "BATCH_FSYNC_INTERVAL_S",
    "CURSOR_FILE",
    "HEADER_SIZE",
    "LOCK_FILE",
    "MAGIC",
    "MAX_BYTES_SETTING",
    "FsyncPolicy",
    "Spool",
    "SpoolCorruptError",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
    "SpooledRecord",
    "segment_name",
]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch", "never"]
_POLICIES: Final = ("always", "batch", "never")

MAX_BYTES_SETTING: Final = "TOLLGATE_SPOOL_MAX_BYTES"
BATCH_FSYNC_INTERVAL_S: Final = 0.1
CURSOR_FILE: Final = "ack.cursor"
_CURSOR_TMP: Final = "ack.cursor.tmp"
LOCK_FILE: Final = "spool.lock"

MAGIC: Final = b"TGS\x01"
# magic, crc32, body_len, seq, timestamp_ms, topic_len, key_len
_HEADER: Final = struct.Struct("<4sIIQqHi")
# the CRC-covered part of the header: body_len .. key_len
_META: Final = struct.Struct("<IQqHi")
_CRC_FIELD: Final = struct.Struct("<I")
HEADER_SIZE: Final = _HEADER.size
_META_OFFSET: Final = 8
_MAX_TOPIC_BYTES: Final = 0xFFFF
_MAX_KEY_BYTES: Final = 0x7FFFFFFF
_MAX_BODY_BYTES: Final = 0xFFFFFFFF

_SEGMENT_RE: Final = re.compile(r"^spool-(\d{20})\.log$")

_datasync = getattr(os, "fdatasync", os.fsync)


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has seq ``first_seq``."""
    return f"spool-{first_seq:020d}.log"


class SpoolError(Exception):
    """Base class of the spool's errors."""


class SpoolFullError(SpoolError):
    """``append`` would push the un-acked spool past ``max_bytes``."""


class SpoolLockedError(SpoolError):
    """Another ``Spool`` (in this or another process) has the directory open."""


class SpoolCorruptError(SpoolError):
    """The spool on disk is damaged somewhere other than a torn tail; an operator decides."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"spool file {path} is corrupt at byte offset {offset}: {reason}. Nothing was "
            "modified; move the damaged file out of the spool directory (and replay or "
            "discard its records by hand) before restarting."
        )


@dataclass(frozen=True)
class SpooledRecord:
    """One spooled Kafka record."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int


class _Segment:
    """One segment file and the offsets of its records (record i has seq first_seq + i)."""

    __slots__ = ("fd", "first_seq", "offsets", "path", "size")

    def __init__(self, path: Path, first_seq: int, offsets: array[int], size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.offsets = offsets
        self.size = size
        self.fd: int | None = None

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


# (topic utf-8, key, value, timestamp_ms, CRC32 of the body)
_Encoded = tuple[bytes, bytes | None, bytes, int, int]


def _check_record(buf: bytes | mmap.mmap, pos: int, limit: int) -> tuple[int, int] | str:
    """Validate the record at ``pos``: ``(seq, end_offset)`` or the reason it is invalid."""
    if limit - pos < HEADER_SIZE:
        return f"truncated header ({limit - pos} of {HEADER_SIZE} bytes)"
    magic, crc, body_len, seq, _ts, topic_len, key_len = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return f"bad magic {magic!r}"
    if key_len < -1 or topic_len + max(key_len, 0) > body_len:
        return f"inconsistent lengths (body {body_len}, topic {topic_len}, key {key_len})"
    end = pos + HEADER_SIZE + body_len
    if end > limit:
        return f"truncated record (needs {end - pos} bytes, {limit - pos} present)"
    body_crc = zlib.crc32(buf[pos + HEADER_SIZE : end])
    if zlib.crc32(buf[pos + _META_OFFSET : pos + HEADER_SIZE], body_crc) != crc:
        return "CRC32 mismatch"
    return seq, end


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Spool:
    """Append-only, CRC-checked, segmented on-disk queue of Kafka records. See module doc."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 1 << 30,
        fsync: FsyncPolicy = "batch",
        segment_bytes: int = 64 << 20,
    ) -> None:
        if fsync not in _POLICIES:
            raise ValueError(f"fsync must be one of {_POLICIES}, got {fsync!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be > 0, got {segment_bytes}")
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._fsync: FsyncPolicy = fsync
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._segments: list[_Segment] = []
        self._acked = 0
        self._next_seq = 1
        self._size = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._dirty = False  # "batch": data written since the last fdatasync
        self._dirty_since = 0.0
        self._cursor_dirty = False  # "never": cursor replaced without fsync
        self._flusher: threading.Thread | None = None

        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"spool directory {self._dir} is already open by another Spool "
                "(this or another process holds its spool.lock)"
            ) from None
        try:
            self._recover()
        except BaseException:
            for seg in self._segments:
                seg.close()
            os.close(self._lock_fd)
            raise
        if fsync == "batch":
            self._flusher = threading.Thread(
                target=self._flusher_main, name=f"tollgate-spool-fsync:{self._dir}", daemon=True
            )
            self._flusher.start()

    # -- public API ------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def depth(self) -> int:
        """Number of un-acked records."""
        with self._lock:
            return self._next_seq - 1 - self._acked

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the segment files that still hold un-acked records."""
        with self._lock:
            return self._size

    @property
    def last_acked_seq(self) -> int:
        with self._lock:
            return self._acked

    def append(self, topic: str, key: bytes | None, value: bytes, timestamp_ms: int) -> int:
        """Spool one record; returns its seq. Raises ``SpoolFullError`` when full."""
        return self._append_encoded([self._encode(topic, key, value, timestamp_ms)])[0]

    def append_many(self, records: Iterable[tuple[str, bytes | None, bytes, int]]) -> list[int]:
        """Spool ``(topic, key, value, timestamp_ms)`` records, all or none, one ``write``
        per segment touched. Returns their seqs in order."""
        encoded = [self._encode(t, k, v, ts) for t, k, v, ts in records]
        if not encoded:
            return []
        return self._append_encoded(encoded)

    def peek(self, max_records: int) -> list[SpooledRecord]:
        """The oldest ``max_records`` un-acked records, in seq order; nothing is removed."""
        out: list[SpooledRecord] = []
        with self._lock:
            self._check_usable()
            seq = self._acked + 1
            remaining = min(max_records, self._next_seq - seq)
            for seg in self._segments:
                if remaining <= 0:
                    break
                if seg.last_seq < seq:
                    continue
                i = seq - seg.first_seq
                j = min(len(seg.offsets), i + remaining)
                start = seg.offsets[i]
                end = seg.offsets[j] if j < len(seg.offsets) else seg.size
                buf = self._pread(seg, start, end - start)
                pos = 0
                for k in range(i, j):
                    pos = self._decode_into(out, seg, buf, pos, start, seg.first_seq + k)
                seq = seg.first_seq + j
                remaining -= j - i
        return out

    def ack(self, up_to_seq: int) -> None:
        """Mark every record with seq <= ``up_to_seq`` delivered: persist the cursor, then
        delete segment files that are fully acked. Acking an old seq again is a no-op."""
        with self._lock:
            self._check_usable()
            if up_to_seq <= self._acked:
                return
            if up_to_seq >= self._next_seq:
                raise ValueError(
                    f"cannot ack seq {up_to_seq}: the spool's last seq is {self._next_seq - 1}"
                )
            n_drop = 0
            while n_drop < len(self._segments) and self._segments[n_drop].last_seq <= up_to_seq:
                n_drop += 1
            # Under "batch" the cursor is made durable lazily (flush, close, or before a segment
            # is deleted): a cursor lost to a power cut only re-sends acked records, which
            # consumers de-duplicate, and the event loop is spared an fsync per Kafka ack.
            self._write_cursor(up_to_seq, durable=self._fsync == "always" or n_drop > 0)
            self._acked = up_to_seq
            if n_drop:
                dropped, self._segments = self._segments[:n_drop], self._segments[n_drop:]
                for seg in dropped:
                    self._size -= seg.size
                    seg.close()
                    try:
                        seg.path.unlink(missing_ok=True)
                    except OSError:  # acked anyway; the next open deletes it
                        log.warning("spool: could not delete acked segment %s", seg.path)
                if not self._segments:
                    self._dirty = False  # nothing left that needs syncing
                if self._fsync != "never":
                    _fsync_dir(self._dir)

    def flush(self) -> None:
        """fdatasync the active segment and make the ack cursor durable (any policy)."""
        with self._lock:
            self._check_usable()
            self._sync_locked(force=True)

    def close(self) -> None:
        """Sync (unless fsync="never"), stop the flusher thread, release the directory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        with self._lock:
            try:
                if self._broken is None and self._fsync != "never":
                    self._sync_locked(force=False)
            finally:
                for seg in self._segments:
                    seg.close()
                os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        depth = self._next_seq - 1 - self._acked
        return (
            f"Spool({str(self._dir)!r}, fsync={self._fsync!r}, depth={depth}, "
            f"size_bytes={self._size}, max_bytes={self._max_bytes})"
        )

    # -- writing ---------------------------------------------------------------------

    @staticmethod
    def _encode(topic: str, key: bytes | None, value: bytes, timestamp_ms: int) -> _Encoded:
        """Validate and pre-compute everything except the seq (done outside the lock)."""
        if not isinstance(topic, str):
            raise TypeError(f"topic must be str, got {type(topic).__name__}")
        if key is not None and not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be bytes or None, got {type(key).__name__}")
        if not isinstance(value, bytes | bytearray):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        topic_b = topic.encode("utf-8")
        if len(topic_b) > _MAX_TOPIC_BYTES:
            raise ValueError(f"topic is {len(topic_b)} bytes, the limit is {_MAX_TOPIC_BYTES}")
        if key is not None and len(key) > _MAX_KEY_BYTES:
            raise ValueError(f"key is {len(key)} bytes, the limit is {_MAX_KEY_BYTES}")
        body_len = len(topic_b) + (len(key) if key is not None else 0) + len(value)
        if body_len > _MAX_BODY_BYTES:
            raise ValueError(f"record body is {body_len} bytes, the limit is {_MAX_BODY_BYTES}")
        key_b = bytes(key) if key is not None else None
        value_b = bytes(value)
        body_crc = zlib.crc32(value_b, zlib.crc32(key_b or b"", zlib.crc32(topic_b)))
        return topic_b, key_b, value_b, int(timestamp_ms), body_crc

    def _append_encoded(self, encoded: list[_Encoded]) -> list[int]:
        with self._lock:
            self._check_usable()
            first_seq = self._next_seq
            blobs: list[bytes] = []
            for n, (topic_b, key_b, value_b, ts, body_crc) in enumerate(encoded):
                key_len = -1 if key_b is None else len(key_b)
                body_len = len(topic_b) + max(key_len, 0) + len(value_b)
                meta = _META.pack(body_len, first_seq + n, ts, len(topic_b), key_len)
                crc = zlib.crc32(meta, body_crc)
                blobs.append(
                    b"".join((MAGIC, _CRC_FIELD.pack(crc), meta, topic_b, key_b or b"", value_b))
                )
            total = sum(len(b) for b in blobs)
            if self._size + total > self._max_bytes:
                raise SpoolFullError(
                    f"spool {self._dir} is full: {self._size} bytes un-acked + {total} new "
                    f"bytes ({len(blobs)} records) would exceed max_bytes={self._max_bytes}. "
                    f"Raise {MAX_BYTES_SETTING} or restore the Kafka connection so the "
                    "backlog drains."
                )
            self._write_blobs(blobs)
            self._next_seq = first_seq + len(blobs)
            return list(range(first_seq, self._next_seq))

    def _write_blobs(self, blobs: list[bytes]) -> None:
        """Write records, rolling segments as needed; on any failure undo all of it."""
        n_segments = len(self._segments)
        orig = self._segments[-1] if self._segments else None
        orig_size = orig.size if orig is not None else 0
        orig_count = len(orig.offsets) if orig is not None else 0
        orig_total = self._size
        try:
            seq = self._next_seq
            pending: list[bytes] = []
            active = orig
            for blob in blobs:
                if active is None or (
                    active.size > 0 and active.size + len(blob) > self._segment_bytes
                ):
                    if active is not None and pending:
                        _write_all(self._wfd(active), b"".join(pending))
                        pending = []
                    active = self._roll(seq, active)
                active.offsets.append(active.size)
                active.size += len(blob)
                self._size += len(blob)
                pending.append(blob)
                seq += 1
            assert active is not None
            _write_all(self._wfd(active), b"".join(pending))
            if self._fsync == "always":
                _datasync(self._wfd(active))
        except BaseException:
            try:
                for seg in self._segments[n_segments:]:
                    seg.close()
                    seg.path.unlink(missing_ok=True)
                del self._segments[n_segments:]
                if orig is not None:
                    os.ftruncate(self._wfd(orig), orig_size)
                    del orig.offsets[orig_count:]
                    orig.size = orig_size
                self._size = orig_total
            except BaseException as undo_exc:
                self._broken = undo_exc
                log.exception("spool %s: could not undo a failed append", self._dir)
            raise
        if self._fsync == "batch" and not self._dirty:
            self._dirty = True
            self._dirty_since = time.monotonic()
            self._cond.notify_all()

    def _roll(self, first_seq: int, sealed: _Segment | None) -> _Segment:
        if sealed is not None and self._fsync != "never":
            _datasync(self._wfd(sealed))
            self._dirty = False
        path = self._dir / segment_name(first_seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        seg = _Segment(path, first_seq, array("Q"), 0)
        seg.fd = fd
        self._segments.append(seg)
        if self._fsync != "never":
            _fsync_dir(self._dir)
        return seg

    def _wfd(self, seg: _Segment) -> int:
        if seg.fd is None:
            seg.fd = os.open(seg.path, os.O_RDWR | os.O_APPEND)
        return seg.fd

    def _write_cursor(self, seq: int, *, durable: bool) -> None:
        tmp = self._dir / _CURSOR_TMP
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, f"{seq}\n".encode("ascii"))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._dir / CURSOR_FILE)
        if durable:
            _fsync_dir(self._dir)
        self._cursor_dirty = not durable

    def _sync_locked(self, *, force: bool) -> None:
        if self._segments and (force or self._dirty):
            _datasync(self._wfd(self._segments[-1]))
        self._dirty = False
        if self._cursor_dirty and force:
            self._write_cursor(self._acked, durable=True)

    def _flusher_main(self) -> None:
        """Background thread of the "batch" policy: fdatasync the active segment at most
        BATCH_FSYNC_INTERVAL_S after the first append that is not yet synced."""
        while True:
            with self._cond:
                while True:
                    if self._closed or self._broken is not None:
                        return
                    if not self._dirty:
                        self._cond.wait()
                        continue
                    delay = self._dirty_since + BATCH_FSYNC_INTERVAL_S - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                self._dirty = False
                if not self._segments:
                    continue
                fd = os.dup(self._wfd(self._segments[-1]))
            try:  # sync a dup outside the lock: appends go on meanwhile
                _datasync(fd)
            except OSError:
                log.exception("spool %s: background fdatasync failed; will retry", self._dir)
                with self._cond:
                    if not self._dirty:
                        self._dirty = True
                        self._dirty_since = time.monotonic()
            finally:
                os.close(fd)

    def _check_usable(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self._dir} is closed")
        if self._broken is not None:
            raise SpoolError(
                f"spool {self._dir} is unusable after a failed write could not be undone "
                f"({self._broken!r}); close and reopen it to re-validate the files"
            )

    # -- reading ---------------------------------------------------------------------

    def _pread(self, seg: _Segment, offset: int, size: int) -> bytes:
        fd = self._wfd(seg)
        chunks: list[bytes] = []
        got = 0
        while got < size:
            chunk = os.pread(fd, size - got, offset + got)
            if not chunk:
                raise SpoolCorruptError(
                    seg.path, offset + got, "file is shorter than the spool's index of it"
                )
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _decode_into(
        out: list[SpooledRecord], seg: _Segment, buf: bytes, pos: int, base: int, seq: int
    ) -> int:
        checked = _check_record(buf, pos, len(buf))
        if isinstance(checked, str):
            raise SpoolCorruptError(seg.path, base + pos, checked)
        if checked[0] != seq:
            raise SpoolCorruptError(seg.path, base + pos, f"expected seq {seq}, found {checked[0]}")
        _, _, _, _, ts, topic_len, key_len = _HEADER.unpack_from(buf, pos)
        p = pos + HEADER_SIZE
        topic = buf[p : p + topic_len].decode("utf-8")
        p += topic_len
        key = None if key_len < 0 else buf[p : p + key_len]
        p += max(key_len, 0)
        end = checked[1]
        out.append(SpooledRecord(seq, topic, key, buf[p:end], ts))
        return end

    # -- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        (self._dir / _CURSOR_TMP).unlink(missing_ok=True)
        found: list[tuple[int, Path]] = []
        for entry in self._dir.iterdir():
            m = _SEGMENT_RE.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
        found.sort()
        cursor_path = self._dir / CURSOR_FILE
        cursor = self._read_cursor(cursor_path, found[0][0] - 1 if found else 0)
        deleted = False

        # Segment i holds seqs < first_seq of segment i+1: drop fully-acked ones unscanned.
        kept: list[tuple[int, Path]] = []
        for i, (first_seq, path) in enumerate(found):
            if i + 1 < len(found) and found[i + 1][0] - 1 <= cursor:
                path.unlink()
                deleted = True
            else:
                kept.append((first_seq, path))

        expected_first: int | None = None
        for i, (first_seq, path) in enumerate(kept):
            is_last = i == len(kept) - 1
            if expected_first is not None and first_seq != expected_first:
                raise SpoolCorruptError(
                    path,
                    0,
                    f"segment starts at seq {first_seq} but the previous one ends at seq "
                    f"{expected_first - 1}: records are missing",
                )
            offsets, size = self._scan(path, first_seq, is_last)
            if not offsets:
                if not is_last:
                    raise SpoolCorruptError(path, 0, "empty segment in the middle of the spool")
                path.unlink()  # created just before a crash, never written
                deleted = True
                break
            self._segments.append(_Segment(path, first_seq, offsets, size))
            expected_first = first_seq + len(offsets)

        if self._segments and self._segments[0].first_seq > cursor + 1:
            first = self._segments[0]
            raise SpoolCorruptError(
                first.path,
                0,
                f"records {cursor + 1}..{first.first_seq - 1} are missing: the ack cursor "
                f"({cursor_path}) is at {cursor} but the oldest segment starts at "
                f"seq {first.first_seq}",
            )
        # Only the last segment can be fully acked here (e.g. its unsynced tail was lost
        # in a power loss after the cursor had been made durable).
        if self._segments and self._segments[-1].last_seq <= cursor:
            self._segments.pop().path.unlink()
            deleted = True
        if deleted and self._fsync != "never":
            _fsync_dir(self._dir)

        self._acked = cursor
        last_on_disk = self._segments[-1].last_seq if self._segments else 0
        self._next_seq = max(cursor, last_on_disk) + 1
        self._size = sum(seg.size for seg in self._segments)
        if self._segments:
            self._wfd(self._segments[-1])
        if self.depth:
            log.info(
                "spool %s: %d un-acked records (%d bytes) to replay, seqs %d..%d",
                self._dir,
                self._next_seq - 1 - self._acked,
                self._size,
                self._acked + 1,
                self._next_seq - 1,
            )

    @staticmethod
    def _read_cursor(path: Path, fallback: int) -> int:
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return 0
        try:
            value = int(text.strip())
            if value < 0:
                raise ValueError(value)
        except ValueError:
            # Only reachable after a power loss under fsync="never" (or disk damage).
            # Re-delivering everything still on disk is at-least-once, never a loss.
            log.warning(
                "spool: ack cursor %s is unreadable (%r); re-delivering every record on "
                "disk (from seq %d)",
                path,
                text[:40],
                fallback + 1,
            )
            return fallback
        return value

    def _scan(self, path: Path, first_seq: int, is_last: bool) -> tuple[array[int], int]:
        """Index a segment's records, verifying each; truncate a torn tail of the last one."""
        offsets: array[int] = array("Q")
        size = path.stat().st_size
        if size == 0:
            return offsets, 0
        expected = first_seq
        pos = 0
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            while pos < size:
                checked = _check_record(mm, pos, size)
                if isinstance(checked, str):
                    reason = checked
                    break
                seq, end = checked
                if seq != expected:
                    raise SpoolCorruptError(path, pos, f"expected seq {expected}, found {seq}")
                offsets.append(pos)
                pos = end
                expected += 1
            else:
                return offsets, size
            if not is_last:
                raise SpoolCorruptError(path, pos, reason)
            # A torn write leaves garbage only at the very end. If a valid record with a
            # plausible seq follows the bad bytes, the damage is in the middle: refuse.
            probe = mm.find(MAGIC, pos + 1)
            while probe >= 0:
                later = _check_record(mm, probe, size)
                if not isinstance(later, str) and later[0] >= expected:
                    raise SpoolCorruptError(
                        path,
                        pos,
                        f"{reason}, but a valid record (seq {later[0]}) follows at offset "
                        f"{probe}, so this is not a torn tail",
                    )
                probe = mm.find(MAGIC, probe + 1)
        with open(path, "r+b") as tf:
            tf.truncate(pos)
            if self._fsync != "never":
                os.fsync(tf.fileno())
        log.warning(
            "spool: dropped %d bytes of torn tail from %s at offset %d (%s); the %d records "
            "before it are intact",
            size - pos,
            path,
            pos,
            reason,
            len(offsets),
        )
        return offsets, pos
