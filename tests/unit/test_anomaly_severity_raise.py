"""An incident that grows critical reaches the targets that page only critical alerts.

Alert targets filter by severity (``min_severity``): warnings to a chat channel, critical
alerts to the pager, as teams route them. An alert's severity was fixed when it fired, so a
loop that fired at 2x and grew to 40x, a ramp, a drift, stayed a warning to the end, and a
target with ``min_severity="critical"`` never heard of it; nor of a user's 40x loop that
joined a feature's warning page as ``related``. Now the lifecycle publishes one update when
an open incident's verdicts become critical (``details.severity_raised_from``), and each
firing record says how severe the incident's records were before it
(``details.incident_severity_before``): the first record of an incident a target's severity
filter lets through pages that target, and its resolve follows it there.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.alerting import AlertManager
from app.alerts_config import AlertTarget
from tests.unit.test_anomaly_lifecycle_property import (
    T0,
    Run,
    _check,
    _episodes,
    _key,
    _play,
    _step,
    _verdict,
)

PAGER = AlertTarget(name="pager", url="http://127.0.0.1:9/pager", min_severity="critical")
CHAT = AlertTarget(name="chat", url="http://127.0.0.1:9/chat")


def _paged(run: Run, target: AlertTarget) -> list[dict[str, Any]]:
    return [r for r in run.published if target.accepts(r) and target.declines(r) is None]


def test_a_loop_that_fires_as_a_warning_and_grows_critical_pages_a_critical_only_target() -> None:
    """2x for a minute (paged as a warning), then 40x: the pager hears of it once, and of
    its end; the chat channel got the warning page and is not paged again."""
    run = _play([_key("user:u1", "volume_spike")], [(0, 3, 20, True, 2.0, False),
                                                    (0, 6, 20, True, 40.0, False)])  # fmt: skip
    pager = _paged(run, PAGER)
    assert [(r["status"], r["severity"]) for r in pager] == [
        ("firing", "critical"),
        ("resolved", "critical"),
    ], [(r["status"], r["incident_role"], r["message"]) for r in run.published]
    assert pager[0]["details"]["severity_raised_from"] == "warning"
    assert pager[0]["message"].startswith("now critical"), pager[0]["message"]
    chat = _paged(run, CHAT)
    assert [(r["status"], r["severity"]) for r in chat] == [
        ("firing", "warning"),
        ("resolved", "critical"),
    ]
    _check(run)


def test_a_critical_member_of_a_warning_page_pages_a_critical_only_target() -> None:
    """A feature's surge paged as a warning; a user's 40x loop of that feature joined it two
    minutes later as `related`: the pager, which never got the warning, gets the loop and
    its resolve; the chat channel, which got the page, only the page."""
    keys = [_key("feature:a", "volume_spike"), _key("user:u1", "volume_spike")]
    run = _play(keys, _episodes(keys, [(0, 0, 10, 20, 2.0, False), (1, 2, 5, 20, 40.0, False)], 0))
    pager = _paged(run, PAGER)
    assert [(r["alert_key"], r["status"]) for r in pager] == [
        ("volume_spike|user:u1", "firing"),
        ("volume_spike|user:u1", "resolved"),
    ], [(r["alert_key"], r["status"], r["incident_role"], r["severity"]) for r in run.published]
    assert pager[0]["incident_role"] == "related"
    assert pager[0]["details"]["incident_severity_before"] == "warning"
    chat = _paged(run, CHAT)
    assert [(r["alert_key"], r["status"]) for r in chat] == [
        ("volume_spike|feature:a", "firing"),
        ("volume_spike|feature:a", "resolved"),
    ]
    _check(run)


def test_an_incident_critical_within_its_hold_pages_once_everywhere() -> None:
    """2x, then 40x 5 s later: the page, held 20 s for its incident, goes out critical; the
    update waits for it and rides along (no second page for the pager)."""
    run = _play([_key("user:u1", "volume_spike")], [(0, 1, 20, True, 2.0, False),
                                                    (0, 6, 5, True, 40.0, False)])  # fmt: skip
    for target in (PAGER, CHAT):
        paged = _paged(run, target)
        assert [(r["status"], r["incident_role"]) for r in paged] == [
            ("firing", "primary"),
            ("resolved", "primary"),
        ], (target.name, [(r["status"], r["incident_role"], r["severity"]) for r in paged])
        assert paged[0]["severity"] == "critical"
    raised = [r for r in run.published if "severity_raised_from" in r["details"]]
    assert len(raised) == 1 and raised[0]["incident_role"] == "related"
    page = next(r for r in run.published if r["incident_role"] == "primary")
    assert run.published.index(page) < run.published.index(raised[0])
    _check(run)


def test_a_trailing_member_that_grows_critical_after_the_page_resolved_pages_again() -> None:
    """A feature's cost page resolved while a user at 2x (joined after the page: it trails
    it) kept the incident open; the user's cost then went to 12x: on-call's last word was
    "back to normal", so the incident pages again, escalated, naming the user."""
    keys = [_key("feature:a", "cost_per_request"), _key("user:u1", "cost_per_request")]
    episodes = [(0, 0, 10, 30, 4.0, False), (1, 2, 30, 60, 2.0, False),
                (1, 33, 10, 30, 12.0, False)]  # fmt: skip
    run = _play(keys, _episodes(keys, episodes, 60))
    user = [r for r in run.published if r["alert_key"] == "cost_per_request|user:u1"]
    raised = [r for r in user if "severity_raised_from" in r["details"]]
    assert len(raised) == 1, [(r["status"], r["incident_role"], r["message"]) for r in user]
    assert raised[0]["incident_role"] == "primary", raised[0]
    assert raised[0]["message"].startswith("escalated, now critical ("), raised[0]["message"]
    assert _leads(raised[0]["message"]) == 1, raised[0]["message"]
    assert [r["status"] for r in _paged(run, PAGER)] == ["firing", "resolved"]
    _check(run)


def test_an_incident_is_raised_once_and_never_lowered() -> None:
    """Critical, warning, critical again: one update; its resolve says critical."""
    manager = AlertManager(_play([], []).s)
    records: list[dict[str, Any]] = []
    ts = T0
    for size in (2.0, 40.0, 2.0, 40.0, 2.0):
        ts = ts.replace(second=ts.second + 10)
        records += manager.process(_verdict("volume_spike", "user:u1", ts, True, size))
    assert [r["severity"] for r in records] == ["warning", "critical"]
    assert records[1]["details"]["severity_raised_from"] == "warning"
    assert manager.firing["volume_spike|user:u1"].severity == "critical"


# -- a review's cases (each failed on the change's first version) --------------------------
WARN = AlertTarget(name="warn", url="http://127.0.0.1:9/warn", min_severity="warning")


def _firings(run: Run, target: AlertTarget) -> list[dict[str, Any]]:
    return [r for r in _paged(run, target) if r["status"] == "firing"]


def test_a_cost_incident_reopened_after_a_silence_pages_no_target_again() -> None:
    """Closed for want of calls, reopened in the calls back: one incident, no new page, for a
    target with `min_severity` as for one without (the reopen's incident was re-created and
    said nothing had been published of it: every target with a severity filter was paged)."""
    keys = [_key("feature:a", "cost_per_request")]
    for size in (12.0, 2.0):
        run = _play(keys, _episodes(keys, [(0, 0, 14, 30, size, False),
                                           (0, 75, 15, 30, size, True)], 0))  # fmt: skip
        assert any(r["details"].get("reopened") == "true" for r in run.published)
        for target in (PAGER, WARN, CHAT):
            paged = _firings(run, target)
            assert len(paged) <= 1 and all(r["incident_role"] == "primary" for r in paged), (
                size,
                target.name,
                [r["message"] for r in paged],
            )
        _check(run)


def _money(run: Run, ts: datetime, kind: str, scope: str, size: float, usd: float) -> None:
    run.verdict(replace(_verdict(kind, scope, ts, True, size), impact_usd_per_hour=usd))


def _quiet(run: Run, ts: datetime, scopes: tuple[str, ...]) -> None:
    for _ in range(60):
        ts = _step(run, ts, 60)
        for kind in ("volume_spike", "cost_per_request"):
            for scope in scopes:
                run.verdict(_verdict(kind, scope, ts, False, 1.0))


def test_an_escalation_by_money_still_pages_a_target_without_min_severity() -> None:
    """A feature's rate paged at $6/hour, grew critical ($234/hour: an update, related); its
    cost alert then came at $80/hour, 10x what the page said: it escalates, for every target
    (the update had replaced the page's figures, and the $80 compared with $234 stayed
    related: the channel never heard of it)."""
    run = Run(_play([], []).s)
    ts = T0
    run.tick(ts)
    for size, count in ((2.0, 6), (40.0, 3)):
        for _ in range(count):
            ts = _step(run, ts, 20)
            run.verdict(_verdict("volume_spike", "feature:a", ts, True, size))
    ts = _step(run, ts, 20)
    _money(run, ts, "cost_per_request", "feature:a", 4.0, 80.0)
    _quiet(run, ts, ("feature:a",))
    escalated = [r for r in _firings(run, CHAT) if "escalated_from" in r["details"]]
    assert len(escalated) == 1 and escalated[0]["alert_key"] == "cost_per_request|feature:a"
    _check(run)


def test_a_pagers_trigger_is_resolved_when_a_later_escalation_takes_its_place() -> None:
    """A feature's page resolved; a trailing user at 2x grew to 40x: its update escalated
    (the pager's trigger); a cost alert of that user with 10x the money escalated over it:
    the update's resolve, now a member's, went nowhere, and the trigger stayed open."""
    run = Run(_play([], []).s)
    ts = T0
    run.tick(ts)
    for _ in range(6):
        ts = _step(run, ts, 10)
        run.verdict(_verdict("volume_spike", "feature:a", ts, True, 40.0))
    for size, count in ((2.0, 30), (40.0, 3)):
        for _ in range(count):
            ts = _step(run, ts, 20)
            run.verdict(_verdict("volume_spike", "user:u1", ts, True, size))
    ts = _step(run, ts, 20)
    _money(run, ts, "cost_per_request", "user:u1", 12.0, 5000.0)
    _quiet(run, ts, ("feature:a", "user:u1"))
    for target in (PAGER, CHAT):
        open_triggers: set[str] = set()
        for r in _paged(run, target):
            if r["status"] == "firing":
                open_triggers.add(r["alert_key"])
            else:
                open_triggers.discard(r["alert_key"])
        assert not open_triggers, (target.name, open_triggers)
    _check(run)


def test_a_trailing_member_grown_critical_does_not_reopen_a_key_a_recurrence_holds() -> None:
    """The feature's page resolved while a trailing user kept the incident open; the feature
    recurred and paged under the incident's key (its page had resolved); then the user grew
    critical: escalating the old incident would give two open pages one key (the user's
    resolve read as the incident's while the recurrence went on). It is related there."""
    keys = [_key("feature:a", "volume_spike"), _key("user:u1", "volume_spike")]
    episodes = [(0, 0, 5, 20, 4.0, False), (1, 2, 40, 60, 2.0, False),
                (0, 10, 30, 600, 4.0, False), (1, 43, 2, 20, 40.0, False)]  # fmt: skip
    run = _play(keys, _episodes(keys, episodes, 0))  # Run asserts one key per open page
    _check(run)


def test_a_checkpoint_from_before_severities_were_followed_pages_no_target_again() -> None:
    """An incident paged critical, checkpointed by the previous version (its groups without
    the new fields), restored: a member joining after it is not the pager's first record."""
    run = Run(_play([], []).s)
    ts = T0
    run.tick(ts)
    for _ in range(6):
        ts = _step(run, ts, 10)
        run.verdict(_verdict("volume_spike", "feature:a", ts, True, 40.0))
    ts = _step(run, ts, 30)
    for group in run.correlator.groups:
        for name in ("notified", "first_before", "paged_keys", "pending"):
            group.__dict__.pop(name, None)
    run.checkpoint()
    for _ in range(6):
        ts = _step(run, ts, 10)
        run.verdict(_verdict("volume_spike", "user:u1", ts, True, 40.0))
    _quiet(run, ts, ("feature:a", "user:u1"))
    assert len(_firings(run, PAGER)) == 1, [r["message"] for r in _firings(run, PAGER)]
    _check(run)


def test_an_update_of_a_verdict_out_of_order_is_not_before_its_firing() -> None:
    manager = AlertManager(_play([], []).s)
    fired = manager.process(_verdict("volume_spike", "user:u1", T0, True, 2.0))
    (raised,) = manager.process(
        _verdict("volume_spike", "user:u1", T0 - timedelta(minutes=4), True, 40.0)
    )
    assert raised["ts"] >= fired[0]["ts"]


# -- a target's kinds filter (session 36) ------------------------------------------------------
COSTS = AlertTarget(name="costs", url="http://127.0.0.1:9/costs", kinds=("cost_per_request",))
RATES = AlertTarget(name="rates", url="http://127.0.0.1:9/rates", kinds=("volume_spike",))


def test_a_cost_member_of_a_volume_page_pages_a_cost_only_target() -> None:
    """A feature's surge paged as a volume spike; its cost per request went up with it and
    joined as `related`. A target of `cost_per_request` alerts only (a FinOps channel)
    heard nothing of the incident: the page was not its kind, the cost alert rode along.
    It now gets the cost alert, and its resolve; the rates target only the page."""
    keys = [_key("feature:a", "volume_spike"), _key("feature:a", "cost_per_request")]
    run = _play(keys, _episodes(keys, [(0, 0, 10, 20, 4.0, False), (1, 1, 8, 20, 4.0, False)], 0))
    costs = _paged(run, COSTS)
    assert [(r["alert_key"], r["status"]) for r in costs] == [
        ("cost_per_request|feature:a", "firing"),
        ("cost_per_request|feature:a", "resolved"),
    ], [(r["alert_key"], r["status"], r["incident_role"]) for r in run.published]
    assert costs[0]["incident_role"] == "related"
    assert costs[0]["details"]["incident_heard_before"] == "volume_spike=warning"
    rates = _paged(run, RATES)
    assert [(r["alert_key"], r["status"]) for r in rates] == [
        ("volume_spike|feature:a", "firing"),
        ("volume_spike|feature:a", "resolved"),
    ]
    assert [r["alert_key"] for r in _paged(run, CHAT)] == [r["alert_key"] for r in rates]
    _check(run)


def test_a_record_of_an_agent_before_kinds_pages_by_its_severity_alone() -> None:
    """A notifier reading records an older agent published (no `incident_heard_before`):
    the severity rule as before; a record it cannot read counts as heard (never a second
    page)."""
    related = {
        "kind": "cost_per_request",
        "severity": "critical",
        "status": "firing",
        "incident_role": "related",
        "details": {"incident_severity_before": "warning"},
    }
    assert PAGER.declines(related) is None
    assert COSTS.declines(related) == "related"
    garbled = {**related, "details": {"incident_heard_before": "garbage"}}
    assert PAGER.declines(garbled) == "related" and COSTS.declines(garbled) == "related"
    fresh = {**related, "details": {"incident_heard_before": ""}}
    assert PAGER.declines(fresh) is None and COSTS.declines(fresh) is None
    assert CHAT.declines(fresh) == "related"  # no filter: it got the incident's page


def test_an_update_has_an_event_id_of_its_own_in_the_agent() -> None:
    """A fault probe: the agent derives each published record's event id from its alert
    key, status and first_seen (a record regenerated after a crash keeps its id), and an
    update ("now critical") shares all three with the firing it updates: the warehouse kept
    the firing under that id and dropped the update, and a notifier that had sent the firing
    skipped the update as sent (an escalation page lost). Every record of a run gets its own
    id, and the same record made again gets the same one."""
    from agents.anomaly.agent import stable_event_id

    run = _play([_key("user:u1", "volume_spike")], [(0, 3, 20, True, 2.0, False),
                                                    (0, 6, 20, True, 40.0, False)])  # fmt: skip
    assert any("severity_raised_from" in r["details"] for r in run.published)
    ids = [stable_event_id(r) for r in run.published]
    assert len(set(ids)) == len(ids), [(r["status"], r["message"][:40]) for r in run.published]
    assert ids == [stable_event_id(dict(r)) for r in run.published]


LEADS = ("escalated", "recurring", "now info", "now warning", "now critical")


def _leads(message: str) -> int:
    """How many leads ("escalated: ", "recurring: ", "now critical (...): ") open
    ``message`` one after the other."""
    count = 0
    while message.startswith(LEADS) and ": " in message:
        count += 1
        message = message.split(": ", 1)[1]
    return count


def test_a_recurring_incident_that_grows_critical_has_one_lead() -> None:
    """A loop at 2x resolved, anomalous all through its cooldown, fired again (recurring)
    and went to 40x: the update read "now critical (fired as a warning at ...): recurring:
    request rate ...", two prefixes stacked. One lead names both."""
    steps = [(0, 1, 1, True, 2.0, False), (0, 8, 600, True, 2.0, False),
             (0, 6, 20, True, 40.0, False)]  # fmt: skip
    run = _play([_key("user:u1", "volume_spike")], steps)
    raised = [r for r in run.published if "severity_raised_from" in r["details"]]
    assert len(raised) == 1, [r["message"] for r in run.published]
    message = raised[0]["message"]
    assert message.startswith(
        "now critical (fired as a warning at 09:40:01 UTC), recurring: request rate for user:u1"
    ), message
    assert [_leads(r["message"]) for r in run.published if r["status"] == "firing"] == [0, 1, 1]
    _check(run)


def _stray_resolves(run: Run, target: AlertTarget) -> list[str]:
    """The keys of resolves paged to ``target`` in an incident where no firing record of
    their alert was."""
    paged = _paged(run, target)
    fired = {(r["incident_key"], r["alert_key"]) for r in paged if r["status"] == "firing"}
    return [
        r["alert_key"]
        for r in paged
        if r["status"] == "resolved" and (r["incident_key"], r["alert_key"]) not in fired
    ]


@pytest.mark.parametrize(
    ("scopes", "episodes"),
    [
        pytest.param(
            ["feature:a", "user:u1", "user:u3"],
            [(0, 0, 20, 30, 2.0, False), (1, 1, 15, 30, 2.0, False),
             (2, 3, 5, 30, 40.0, False), (1, 8, 5, 20, 40.0, False)],
            id="a-member-grows-critical",
        ),
        pytest.param(
            ["feature:a", "user:u3"],
            [(0, 0, 20, 30, 2.0, False), (1, 3, 5, 30, 40.0, False),
             (0, 8, 5, 20, 40.0, False)],
            id="the-page-grows-critical",
        ),
    ],
)  # fmt: skip
def test_what_grows_critical_after_a_member_paged_the_pager_sends_it_no_resolve(
    scopes: list[str], episodes: list[tuple[int, int, int, int, float, bool]]
) -> None:
    """A feature's warning page; a user at 40x joins it and pages the pager (the incident's
    first critical record); then something else of the incident goes to 40x too: its update
    is not the pager's first of the incident, so it is not paged there. Its resolve went to
    the pager all the same: a resolve of an alert the pager never got (a PagerDuty
    ``resolve`` of a ``dedup_key`` it never triggered; a Slack or JSON receiver shows it).

    ``a-member-grows-critical``: another user at 2x had joined before (a warning: not the
    pager's) and goes to 40x; its resolve carried what the incident had heard before its
    warning firing. ``the-page-grows-critical``: the feature's page itself goes to 40x."""
    keys = [_key(scope, "volume_spike") for scope in scopes]
    run = _play(keys, _episodes(keys, episodes, 60))
    pager = [(r["alert_key"], r["status"]) for r in _paged(run, PAGER)]
    assert pager == [
        ("volume_spike|user:u3", "firing"),
        ("volume_spike|user:u3", "resolved"),
    ], pager
    assert not _stray_resolves(run, PAGER)
    chat = [(r["alert_key"], r["status"]) for r in _paged(run, CHAT)]
    assert chat == [("volume_spike|feature:a", "firing"), ("volume_spike|feature:a", "resolved")]
    _check(run)
