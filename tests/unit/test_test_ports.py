"""The test helpers' free ports: two pytest-xdist workers never hand out the same port."""

from __future__ import annotations

import pytest

from tests import ports


def _drawn(monkeypatch: pytest.MonkeyPatch, worker: str, n: int = 40) -> set[int]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(ports, "_given", set())  # as a fresh worker process
    return {ports.free_port() for _ in range(n)}


def test_two_xdist_workers_draw_from_disjoint_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    if ports._ephemeral_low() is None:
        pytest.skip("no ephemeral port range to stay below on this system")
    first, second = _drawn(monkeypatch, "gw0"), _drawn(monkeypatch, "gw1")
    assert len(first) == len(second) == 40
    assert max(first) < min(second), (sorted(first)[-3:], sorted(second)[:3])


def test_a_slice_is_the_whole_range_outside_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert ports._slice(10_000, 32_768) == (10_000, 32_768)
