"""An anomaly that keeps coming back through its cooldown is one incident, and on-call hears
that it is not over: bursts every 10 minutes for an hour (a cron job gone wild, the bench's
periodic bursts) resolved "back to normal" after the first burst, stayed quiet for
``cooldown_seconds`` (their anomalies counted, not published), and paged again when the
cooldown was over as a new, unrelated incident (6 of the bench's 12 periodic incidents,
seeds 7 and 11, both worlds). Now a firing whose key was anomalous all through its cooldown
(no two anomalies more than ``incident_window_seconds`` apart) says "recurring: ... it is
not over" and pages under the incident's own key. A new anomaly after a quiet stretch
is a new incident, as before. The review of the first version (related, not paged) found
that on-call was then left with "back to normal" and a loop that started 25 minutes later
was never delivered. Session 33: the recurring incident then resolved after its next burst
again ("back to normal" while the bursts went on; two hours of bursts paged three times);
now it resolves after ``incident_window_seconds`` without an anomaly, quiet meanwhile (it
takes in no other alert: a review found a global outage swallowed by it), and an incident
whose page has resolved does not take a recurrence (it was published as ``related``)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import DetectorSettings, Verdict
from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.incidents import Correlator
from tests.anomaly_traffic import T0, Caller, Feature, World, arrivals, firing, merged, pages, run

FEATURE = Feature("chat", economy_share=0.7)
QUIET = Caller("steady", FEATURE, 1.0)  # a call a minute


def _world(seed: int) -> World:
    rng = random.Random(seed)
    others = [Caller(f"u{i}", FEATURE, rng.uniform(0.05, 0.6)) for i in range(30)]
    return World(seed=seed, callers=[QUIET, *others])


def _bursts(
    world: World, rng: random.Random, start: datetime, count: int, every_minutes: float
) -> list[dict[str, Any]]:
    """``count`` bursts of 2 minutes at 100x the user's rate, ``every_minutes`` apart."""
    calls = []
    for k in range(count):
        begin = start + timedelta(minutes=k * every_minutes)
        for ts in arrivals(rng, begin, begin + timedelta(minutes=2), QUIET.per_minute * 99):
            calls.append(world.call(rng, ts, QUIET))
    return calls


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bursts_every_ten_minutes_for_an_hour_page_twice_as_one_incident(seed: int) -> None:
    world = _world(seed)
    start = T0 + timedelta(days=2, hours=14)
    end = start + timedelta(minutes=60)
    rng = random.Random(seed)
    calls = merged(
        world.traffic(T0, end + timedelta(minutes=40)), _bursts(world, rng, start, 6, 10)
    )
    alerts = run(AnomalyEngine(), calls)
    during = [p for p in pages(alerts) if start <= p["_at"] < end + timedelta(minutes=10)]
    mine = [a for a in firing(alerts) if a["scope"] == "user:steady" and a["_at"] >= start]
    assert mine and mine[0]["incident_key"] == during[0]["incident_key"], [
        a["message"] for a in mine
    ]
    # resolved after the first burst, paged again when the cooldown was over: as the same
    # incident, saying it recurs
    assert len(during) == 2, [p["message"] for p in during]
    first, again = during
    assert again["incident_key"] == first["incident_key"], again
    assert again["details"].get("recurring") == "true", again
    assert again["message"].startswith("recurring: "), again["message"]
    assert "it is not over" in again["message"], again["message"]
    later = [a for a in firing(alerts) if a["_at"] >= again["_at"] and a["scope"] != "global"]
    assert all(a["incident_key"] == first["incident_key"] for a in later), later
    # ... and it is not called over until the bursts are: one resolve, after the last burst
    ended = [
        a
        for a in alerts
        if a["status"] == "resolved"
        and a["alert_key"] == again["alert_key"]
        and a["ts"] > again["ts"]
    ]
    assert len(ended) == 1 and ended[0]["ts"] >= end - timedelta(minutes=10), [
        (a["ts"], a["message"]) for a in ended
    ]
    assert "it had come back after the resolve at" in ended[0]["message"], ended[0]["message"]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_second_loop_after_a_quiet_cooldown_pages_again(seed: int) -> None:
    """The other side: a burst, then nothing unusual for longer than the cooldown, then a
    second burst: two incidents, two pages."""
    world = _world(seed)
    start = T0 + timedelta(days=2, hours=14)
    rng = random.Random(seed)
    first = _bursts(world, rng, start, 1, 10)
    second_at = start + timedelta(minutes=75)
    second = _bursts(world, rng, second_at, 1, 10)
    calls = merged(world.traffic(T0, second_at + timedelta(minutes=30)), first, second)
    alerts = run(AnomalyEngine(), calls)
    paged = [p for p in pages(alerts) if p["_at"] >= start]
    assert len(paged) == 2, [p["message"] for p in paged]
    assert paged[1]["_at"] >= second_at, paged[1]["message"]
    assert all(p["details"].get("recurring") is None for p in paged)


# -- the rule itself, on the lifecycle and the correlator (pure logic) ---------------------

T1 = datetime(2024, 5, 1, 12, tzinfo=UTC)
RULE = DetectorSettings(resolve_after_seconds=180, cooldown_seconds=1800)


def _verdict(at: datetime, money: float = 2.0) -> Verdict:
    return Verdict(
        kind="volume_spike",
        scope="user:alice",
        ts=at,
        score=12.0,
        is_anomaly=True,
        expected=1.0,
        observed=100.0,
        unit="requests/min",
        metric="requests/min",
        window_seconds=60,
        impact_usd_per_hour=money,
    )


def _bursts_every(minutes: list[float], money: list[float] | None = None) -> list[dict[str, Any]]:
    """Anomalous verdicts for 2 minutes (every 10 s) from each of ``minutes`` after T1, through
    the lifecycle and the correlator, ticking every 10 s to an hour after the last."""
    manager = AlertManager(RULE)
    correlator = Correlator(RULE, lambda a, b: a == b, lambda *_: False, manager.refreshed)
    verdicts = {}
    for k, m in enumerate(minutes):
        for i in range(12):
            at = T1 + timedelta(minutes=m, seconds=10 * i)
            verdicts[at] = _verdict(at, (money or [2.0] * len(minutes))[k])
    out: list[dict[str, Any]] = []
    end = T1 + timedelta(minutes=max(minutes) + 60)
    now = T1
    while now <= end:
        alerts = manager.process(verdicts[now]) if now in verdicts else []
        out += correlator.process(alerts + manager.tick(now), now)
        now += timedelta(seconds=10)
    return out


def test_anomalies_all_through_the_cooldown_recur_as_the_same_incident() -> None:
    out = _bursts_every([0, 10, 20, 30, 40, 50])
    fired = [a for a in out if a["status"] == "firing"]
    assert [a["incident_role"] for a in fired] == ["primary", "primary"], fired
    first, again = fired
    assert again["incident_key"] == first["incident_key"]
    assert again["details"]["recurring"] == "true"
    assert again["details"]["anomalies_during_cooldown"] == "36"  # bursts at 10, 20 and 30 min
    assert again["message"].startswith("recurring: requests/min for user:alice"), again
    assert "first fired at 12:00:00 UTC resolved at 12:04:50 UTC" in again["message"], again
    assert "never more than 8 min apart: it is not over" in again["message"], again


def test_two_hours_of_bursts_page_twice_and_resolve_after_the_last() -> None:
    """Before (session 32): three pages, the recurring incident resolved after its next
    burst ("back to normal" at 12:44:50) and paged again when that cooldown was over."""
    out = _bursts_every([10 * k for k in range(12)])  # two hours of bursts
    fired = [a for a in out if a["status"] == "firing"]
    assert len(fired) == 2 and len({a["incident_key"] for a in fired}) == 1, fired
    assert "first fired at 12:00:00 UTC" in fired[1]["message"], fired[1]["message"]
    assert fired[1]["details"]["first_fired_at"] == "2024-05-01T12:00:00+00:00"
    resolved = [a for a in out if a["status"] == "resolved"]
    last_anomaly = T1 + timedelta(minutes=111, seconds=50)
    assert [a["ts"] for a in resolved] == [
        T1 + timedelta(minutes=4, seconds=50),
        last_anomaly + timedelta(seconds=RULE.incident_window_seconds),
    ], resolved
    assert resolved[1]["message"].startswith(
        "resolved: volume spike for user:alice is back to normal since 13:51:50 UTC (nothing "
        "anomalous for 15 min: it had come back after the resolve at 12:04:50 UTC), after "
        "111 min anomalous on and off since it first fired at 12:00:00 UTC"
    ), resolved[1]["message"]
    assert resolved[1]["details"]["recurring"] == "true"


def _spike(scope: str, at: datetime, observed: float = 100.0, money: float = 2.0) -> Verdict:
    return Verdict(
        kind="volume_spike",
        scope=scope,
        ts=at,
        score=12.0,
        is_anomaly=True,
        expected=1.0,
        observed=observed,
        unit="requests/min",
        metric="requests/min",
        window_seconds=60,
        impact_usd_per_hour=money,
    )


def _through(
    verdicts: dict[datetime, list[Verdict]], nests: Any, minutes: int
) -> list[dict[str, Any]]:
    manager = AlertManager(RULE)
    correlator = Correlator(RULE, nests, lambda *_: False, manager.refreshed, manager.quiet)
    out: list[dict[str, Any]] = []
    now = T1
    while now <= T1 + timedelta(minutes=minutes):
        alerts = [a for v in verdicts.get(now, []) for a in manager.process(v)]
        out += correlator.process(alerts + manager.tick(now), now)
        now += timedelta(seconds=10)
    return out


def test_a_recurring_incident_waiting_out_its_pause_takes_in_no_outage() -> None:
    """The review's case: a global outage 6 minutes after a recurring user's last burst was
    attached to that user's incident (open 15 minutes after it), and never paged."""
    verdicts: dict[datetime, list[Verdict]] = {}
    for burst in range(0, 50, 10):  # recurs at 12:40 (its cooldown over), the last burst
        for i in range(12):
            at = T1 + timedelta(minutes=burst, seconds=10 * i)
            verdicts.setdefault(at, []).append(_spike("user:alice", at))
    for k in range(10):
        at = T1 + timedelta(minutes=46 + k)
        outage = replace(
            _spike("global", at, observed=2.0, money=-500.0),
            kind="volume_drop",
            expected=500.0,
            score=30.0,
        )
        verdicts.setdefault(at, []).append(outage)
    out = _through(verdicts, lambda a, b: a == b, 120)
    drop = [a for a in out if a["status"] == "firing" and a["alert_key"] == "volume_drop|global"]
    assert [a["incident_role"] for a in drop] == ["primary"], drop


def test_a_recurrence_an_incident_whose_page_resolved_would_take_pages() -> None:
    """A review's case: the page's key resolved ("back to normal" went out) while a weaker
    user, joined after the page, kept the incident open; the key's recurrence joined it as
    ``related``, never delivered by default targets."""
    pair = {"feature:chat", "user:bob"}
    verdicts: dict[datetime, list[Verdict]] = {}
    for burst in range(0, 60, 10):
        for i in range(12):
            at = T1 + timedelta(minutes=burst, seconds=10 * i)
            verdicts.setdefault(at, []).append(_spike("feature:chat", at, money=50.0))
    for k in range(70):  # a weak anomaly every minute from 12:01 on
        at = T1 + timedelta(minutes=1 + k)
        verdicts.setdefault(at, []).append(_spike("user:bob", at, observed=3.0, money=0.1))
    out = _through(verdicts, lambda a, b: a == b or {a, b} == pair, 150)
    chat = [a for a in out if a["alert_key"] == "volume_spike|feature:chat"]
    shown = [(a["status"], a["incident_role"], a["ts"], a["message"][:80]) for a in chat]
    assert [(a["status"], a["incident_role"]) for a in chat] == [
        ("firing", "primary"),
        ("resolved", "primary"),  # "back to normal": on-call's last word ...
        ("firing", "primary"),  # ... until it recurs, as the same incident
        ("resolved", "primary"),  # once, after the last burst
    ], shown
    assert chat[2]["details"]["recurring"] == "true"
    assert len({a["incident_key"] for a in chat}) == 1, shown
    bob = [a for a in out if a["alert_key"] == "volume_spike|user:bob"]
    assert all(a["incident_role"] == "related" for a in bob), bob


def test_a_gap_of_a_cooldown_is_a_new_incident() -> None:
    """Anomalies during the cooldown, then none for ``cooldown_seconds``: a new incident."""
    out = _bursts_every([0, 10, 42])  # the cooldown ends at 34:50; the last anomaly at 11:50
    fired = [a for a in out if a["status"] == "firing"]
    assert [a["incident_role"] for a in fired] == ["primary", "primary"], fired
    assert "recurring" not in fired[1]["details"]
    assert fired[1]["incident_key"] != fired[0]["incident_key"]


def test_a_new_loop_late_in_the_cooldown_is_a_new_incident() -> None:
    """The review's case: a burst, 25 minutes of nothing, then a loop of the same key that
    runs on: anomalies during the cooldown, but not all through it."""
    out = _bursts_every([0, *[27 + 2 * k for k in range(15)]])  # a loop from 12:27 on
    fired = [a for a in out if a["status"] == "firing"]
    assert [a["incident_role"] for a in fired] == ["primary", "primary"], fired
    assert "recurring" not in fired[1]["details"], fired[1]["message"]
    assert fired[1]["incident_key"] != fired[0]["incident_key"]
