"""Free TCP ports for the components a test starts, outside the kernel's ephemeral range.

Binding to port 0 hands out a port from the ephemeral range, and releases it at once: until
the component binds it, any outgoing connection on the machine (a Kafka client's, the
dispatcher's to its upstream) may be given the same port as its local end. A fault run
saw the sink die on "address already in use" for such a port (session 25). Ports below
the range are never handed to outgoing connections, so a port found free there stays
free until the component takes it (only this process hands them out: none twice; under
pytest-xdist each worker draws from its own slice of that range).
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_given: set[int] = set()
_lock = threading.Lock()
_rng = random.Random()


def _ephemeral_low() -> int | None:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _slice(low: int, high: int) -> tuple[int, int]:
    """This process's share of ``[low, high)``: all of it, or one xdist worker's slice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return low, high
    index, n = int(worker[2:]), max(int(count), 1)
    width = (high - low) // n
    return low + (index % n) * width, low + (index % n + 1) * width


def free_port() -> int:
    """A port free right now and below the ephemeral range where the kernel says where that
    is (else one the kernel picks, as before); never the same one twice in this process."""
    low = _ephemeral_low()
    with _lock:
        if low is not None and low - _LOWEST >= 1_000:
            first, end = _slice(_LOWEST, low)
            for _ in range(200):
                port = _rng.randrange(first, end)
                if port not in _given and _bindable(port):
                    _given.add(port)
                    return port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        _given.add(port)
        return port
