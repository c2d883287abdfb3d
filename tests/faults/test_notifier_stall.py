"""The notifier (``tollgate notify``) survives a stall longer than its session, and a kill.

A real notifier process, a real broker, a webhook receiver in this process. Alerts are
produced before, during and after the fault; each must reach the webhook (by event id).
The notifier's contract is at-least-once across a crash (it commits an alert once its targets
are done, see ``agents/notifier.py``): a repeat after a kill is counted and shown, not a
failure. A stall is no crash: the same process never sends an alert twice, so a repeat after
a ``SIGSTOP`` fails (it gave 20 repeats in 20 alerts of the stall before the notifier
remembered what it had sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from tests.faults.harness import (
    TOLLGATE,
    Audit,
    Component,
    ComponentDied,
    FaultStack,
    record_row,
    wait_for,
)
from tests.integration.harness import BackgroundLoop
from tests.integration.test_notifier import Receiver, alert, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STALL_S = 25.0  # the notifier's consumer session times out after 10 s


async def _release(receiver: Receiver) -> None:
    receiver.released.set()


def _delivered(receiver: Receiver) -> list[str]:
    return [r.body["event_id"] for r in receiver.requests]


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_notifier_carries_on_after_a_fault(make_stack: Any, fault: str) -> None:
    stack: FaultStack = make_stack()
    stack.cli("topics", "ensure")
    loop = BackgroundLoop()
    receiver = loop.run(Receiver().start("/hook"))
    targets = json.dumps([{"name": "hook", "url": receiver.url, "format": "json"}])
    notifier = Component(
        "notifier",
        [TOLLGATE, "notify"],
        {**stack.env, "TOLLGATE_ALERT_TARGETS": targets},
        stack.root / "logs" / "notifier.log",
    )
    stack.components["notifier"] = notifier
    sent: list[str] = []

    def send(n: int) -> None:
        records = [alert(scope=f"user:{stack.tag}-{len(sent) + i}") for i in range(n)]
        asyncio.run(produce(stack.settings, records))
        sent.extend(r["event_id"] for r in records)

    def all_delivered() -> bool:
        stack.check_alive("notifier")
        return set(sent) <= set(_delivered(receiver))

    try:
        notifier.start()

        # It starts from the latest offset: probe until one alert gets through.
        def probe() -> bool:
            send(1)
            return wait_until_delivered(sent[-1])

        def wait_until_delivered(event_id: str) -> bool:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if event_id in _delivered(receiver):
                    return True
                time.sleep(0.1)
            return False

        wait_for(probe, 120, "the notifier to deliver a first alert")
        sent.clear()
        sent.extend(_delivered(receiver))  # the probes count too: each must arrive
        send(20)
        wait_for(all_delivered, 60, "the alerts before the fault")
        if fault == "SIGSTOP":
            notifier.stall()
            send(20)  # produced while it is frozen
            time.sleep(STALL_S)  # the fault's length
            notifier.resume()
        else:
            # The webhook is slow at the moment of the crash: the notifier has fetched the
            # alerts (and committed them) and is delivering the first one when it dies.
            receiver.hang = True
            first = len(receiver.requests)
            send(20)
            wait_for(lambda: len(receiver.requests) > first, 60, "a delivery in progress")
            notifier.kill()
            receiver.hang = False
            loop.run(_release(receiver))
            notifier.start()
        started = time.monotonic()
        recovery: float | None = None
        with contextlib.suppress(ComponentDied):  # counted below: alive, and what arrived
            with contextlib.suppress(AssertionError):
                wait_for(all_delivered, 120, "the alerts of the fault's time")
                recovery = time.monotonic() - started
            send(20)  # and it carries on
            with contextlib.suppress(AssertionError):
                wait_for(all_delivered, 120, "the alerts after the fault")
        alive = notifier.alive()
    finally:
        loop.run(receiver.stop())
        loop.close()

    delivered = _delivered(receiver)
    audit = Audit(requests=len(sent), answered=len(set(delivered)))
    audit.lost = [f"alert {e} never delivered" for e in set(sent) - set(delivered)]
    if not alive:
        audit.lost.append(f"the notifier exited with code {notifier.returncode()}")
    repeats = len(delivered) - len(set(delivered))
    detail = f"{repeats} alerts delivered twice (at-least-once across a crash)" if repeats else ""
    label = f"notifier SIGSTOP {STALL_S:.0f} s" if fault == "SIGSTOP" else "notifier SIGKILL"
    record_row(label, audit, recovery, detail).duplicated = repeats
    assert not audit.lost, audit.failures()
    if fault == "SIGSTOP":
        assert repeats == 0, f"{repeats} alerts sent twice by a notifier that never died"
