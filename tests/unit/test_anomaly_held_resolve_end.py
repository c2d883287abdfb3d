"""A page's resolve held for the rest of its incident says when the incident ended.

Probe 57's D7: a user's burst paged (``user:p57-u042``, with ``feature:code`` related); the
user's alarm resolved at 13:18:20, the feature's at 13:20:45, and the page's resolve, held
for the incident, went out at 13:20:45 saying only its own alarm's end ("back to normal since
13:15:20 UTC ... in the 60 s before 13:18:20 UTC"): on-call read a resolve that arrived 2.5
minutes after the time it stated, and nothing of what had kept the incident open. Its record
keeps the page's lifecycle (``first_seen``, ``last_seen``: the notifier's key) and now also
says what ended the incident, and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agents.anomaly.incidents import Correlator
from app.anomaly_config import DetectorSettings

T0 = datetime(2026, 12, 7, 13, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _alert(scope: str, status: str, ts: float, first: float, last: float) -> dict[str, Any]:
    return {
        "alert_key": f"volume_spike|{scope}",
        "kind": "volume_spike",
        "scope": scope,
        "status": status,
        "severity": "critical",
        "ts": _at(ts),
        "first_seen": _at(first),
        "last_seen": _at(last),
        "message": f"{status}: volume spike for {scope}",
        "details": {},
        "impact_usd_per_hour": 150.0 if scope.startswith("user") else 50.0,
    }


def test_a_held_page_resolve_states_the_incidents_end() -> None:
    c = Correlator(DetectorSettings(), lambda a, b: True, lambda narrow, wide, now: True)
    out = c.process([_alert("user:u042", "firing", 0, 0, 0)], _at(0))
    out += c.process([_alert("feature:code", "firing", 1, 1, 1)], _at(1))
    out += c.tick(_at(60))
    assert [a["scope"] for a in out if a["incident_role"] == "primary"] == ["user:u042"]
    # the user's alarm: last anomalous 13:15:20, resolved 13:18:20; the feature's after it
    user_end = _alert("user:u042", "resolved", 1100, 0, 920)
    out = c.process([user_end], _at(1100))
    assert out == []  # held: the feature is still anomalous
    out = c.process([_alert("feature:code", "resolved", 1245, 1, 1065)], _at(1245))
    page_end = next(a for a in out if a["incident_role"] == "primary")
    assert page_end["ts"] == _at(1245)
    assert (page_end["first_seen"], page_end["last_seen"]) == (_at(0), _at(920))
    message = page_end["message"]
    assert message.startswith(user_end["message"]), message
    assert (
        "the incident went on until volume spike for feature:code was back to normal at "
        "13:17:45 UTC, 17 min after it began at 13:00:00 UTC" in message
    ), message
    assert page_end["details"]["incident_last_seen"] == "2026-12-07T13:17:45+00:00"


def test_a_page_resolve_not_held_says_nothing_more() -> None:
    c = Correlator(DetectorSettings(), lambda a, b: True, lambda narrow, wide, now: True)
    c.process([_alert("user:u042", "firing", 0, 0, 0)], _at(0))
    c.process([_alert("feature:code", "firing", 1, 1, 1)], _at(1))
    c.tick(_at(60))
    c.process([_alert("feature:code", "resolved", 300, 1, 120)], _at(300))
    out = c.process([_alert("user:u042", "resolved", 400, 0, 220)], _at(400))
    page_end = next(a for a in out if a["incident_role"] == "primary")
    assert page_end["message"] == "resolved: volume spike for user:u042"
    assert "incident_last_seen" not in page_end["details"]
