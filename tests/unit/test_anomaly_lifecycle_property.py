"""The alert lifecycle and its correlation into incidents, driven by random verdict streams
(hypothesis): invariants that must hold whatever the interleaving of keys, scopes, kinds,
anomalies, pauses and recurrences.

- **Exactly once.** Every record the lifecycle makes (``firing``, ``resolved``) is published
  exactly once, under its own event id; nothing is published that it did not make.
- **One incident per key at a time.** Per alert key the records alternate ``firing``,
  ``resolved``, starting with a firing; a key fires again no sooner than ``cooldown_seconds``
  after its resolve.
- **Nothing hidden.** A critical or recurring firing published as ``related`` joins an
  incident whose page is still open: on-call's latest word on it is a page, not "back to
  normal" (a weak alert may trail a resolved page, as the incidents' docstring says, and a
  cost incident closed by silence reopens as ``related``: its close said its cost was not
  seen back to normal).
- **One key, one open page.** No two incidents whose pages are not resolved share an
  ``incident_key``.
- **One incident per lifecycle.** A firing and its resolve are published under the same
  ``incident_key``.
- **On-call's last word.** Once every key has been normal long enough, every key has
  resolved, every incident is closed and the latest ``primary`` record of every incident is
  its resolve.
"""

from __future__ import annotations

import pickle
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import DetectorSettings, Verdict
from agents.anomaly.incidents import Correlator
from agents.notifier import alertmanager_payload, pagerduty_payload
from app.alerts_config import AlertTarget

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SCOPES = ("global", "feature:a", "feature:b", "user:u1", "user:u2", "user:u3")
HOME = {"user:u1": "feature:a", "user:u2": "feature:b", "user:u3": "feature:a"}
KINDS = ("volume_spike", "cost_per_request")


def _nests(a: str, b: str) -> bool:
    if a == b or "global" in (a, b):
        return True
    return HOME.get(a) == b or HOME.get(b) == a


def _verdict(
    kind: str, scope: str, ts: datetime, anomalous: bool, size: float, resumes: bool = False
) -> Verdict:
    if kind == "volume_spike":
        expected, unit, metric, window = 2.0, "requests/min", "request rate", 120
    else:
        expected, unit, metric, window = 0.01, "usd/request", "cost per request", None
    observed = expected * (size if anomalous else 1.0)
    return Verdict(
        kind=kind,  # type: ignore[arg-type]
        scope=scope,
        ts=ts,
        score=10.0 * size if anomalous else 0.1,
        is_anomaly=anomalous,
        expected=expected,
        observed=observed,
        unit=unit,
        metric=metric,
        window_seconds=window,
        # a rate's money: $3/hour a call a minute (2x and 4x are warnings, 40x critical)
        impact_usd_per_hour=(observed - expected) * 3 if kind == "volume_spike" else size,
        resumes_unseen=resumes and anomalous and kind == "cost_per_request",
    )


KEYS = len(SCOPES) * len(KINDS)
# One stretch of verdicts of one key: the key (an index into the run's few keys), how many
# verdicts, the seconds before each, anomalous or not, its size (ratio), and whether a cost
# alarm says it resumed unseen after a silence. Gaps around the settings' edges: 180 s to
# resolve, 900 s between the anomalies of a recurrence, 1800 s of cooldown and of silence.
STEP = st.tuples(
    st.integers(0, 3),
    st.integers(1, 8),
    st.sampled_from([1, 5, 20, 60, 120, 179, 181, 300, 600, 899, 901, 1700, 1801, 3700]),
    st.booleans(),
    st.sampled_from([2.0, 4.0, 12.0, 40.0]),
    st.booleans(),
)
# Or incidents as they come: a key anomalous every ``every`` seconds from ``start`` minutes in
# for ``minutes``, over every key's normal verdicts every ``normal_every`` seconds (none: 0).
EPISODE = st.tuples(
    st.integers(0, 3),
    st.integers(0, 300),
    st.sampled_from([1, 2, 5, 20, 45, 90, 180]),
    st.sampled_from([10, 60, 170, 400, 890, 1000]),
    st.sampled_from([2.0, 4.0, 12.0, 40.0]),
    st.booleans(),
)
NORMAL_EVERY = st.sampled_from([0, 60, 300, 1200])
# A run's keys: a few, so that each one sees many verdicts.
KEY_SETS = st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=4, unique=True)


class Run:
    """The lifecycle and the correlator wired as the engine wires them."""

    def __init__(self, s: DetectorSettings) -> None:
        self.s = s
        self.manager = AlertManager(s)
        self.correlator = Correlator(
            s,
            _nests,
            lambda narrow, wide, now: HOME.get(narrow) == wide or wide == "global",
            self.manager.refreshed,
            self.manager.quiet,
        )
        self.made: list[dict[str, Any]] = []  # the lifecycle's records, in order
        self.published: list[dict[str, Any]] = []
        self.primary: dict[str, dict[str, Any]] = {}  # incident key -> latest primary
        self.hidden: list[dict[str, Any]] = []

    def _publish(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["incident_role"] == "primary":
                self.primary[r["incident_key"]] = r
            elif (
                r["status"] == "firing"
                and r["details"].get("reopened") != "true"
                and (r["severity"] == "critical" or r["details"].get("recurring") == "true")
            ):
                page = self.primary.get(r["incident_key"])
                if page is None or page["status"] != "firing":
                    self.hidden.append(r)
            self.published.append(r)

    def verdict(self, v: Verdict) -> None:
        records = self.manager.process(v)
        self.made += records
        self._publish(self.correlator.process(records, v.ts))
        self._one_key_per_open_page()

    def tick(self, now: datetime) -> None:
        records = self.manager.tick(now)
        self.made += records
        self._publish(self.correlator.process(records, now))
        self._one_key_per_open_page()

    def _one_key_per_open_page(self) -> None:
        """No two incidents whose pages may still speak share an incident key (a resolve
        under it would read as the other's)."""
        keys = [g.key for g in self.correlator.groups if not g.page_resolved]
        assert len(keys) == len(set(keys)), keys

    def checkpoint(self) -> None:
        """A restart: both restored from their pickles, wired again."""
        self.manager = pickle.loads(pickle.dumps(self.manager))
        correlator: Correlator = pickle.loads(pickle.dumps(self.correlator))
        correlator.nests, correlator.explains = self.correlator.nests, self.correlator.explains
        correlator.refresh, correlator.quiet = self.manager.refreshed, self.manager.quiet
        self.correlator = correlator


Step = tuple[int, int, int, bool, float, bool]


def _step(run: Run, ts: datetime, gap: int) -> datetime:
    """``gap`` seconds on, every minute between ticked (as the engine ticks each minute)."""
    until = ts + timedelta(seconds=gap)
    minute = ts.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while minute <= until:
        run.tick(minute)
        minute += timedelta(minutes=1)
    return until


def _play(
    keys: list[int], steps: list[Step], restart_every: int = 0, lags: list[int] | None = None
) -> Run:
    """``lags``: seconds each key's verdicts come behind the ticks (history replayed into a
    live agent), by the key's index; none: all on time."""
    s = DetectorSettings()
    run = Run(s)
    ts = T0
    run.tick(T0)  # live from T0: a late key's first verdict comes behind it
    verdicts = 0
    for pick, count, gap, anomalous, size, resumes in steps:
        which = keys[pick % len(keys)]
        kind, scope = KINDS[which % len(KINDS)], SCOPES[which // len(KINDS)]
        lag = timedelta(seconds=lags[pick % len(keys)] if lags else 0)
        for _ in range(count):
            ts = _step(run, ts, gap)
            run.verdict(_verdict(kind, scope, ts - lag, anomalous, size, resumes))
            verdicts += 1
            if restart_every and verdicts % restart_every == 0:
                run.checkpoint()
    # then every key normal, enough calls judged normal, for hours: all must resolve
    for _ in range(3 * 60):
        ts += timedelta(minutes=1)
        for i, which in enumerate(keys):
            kind, scope = KINDS[which % len(KINDS)], SCOPES[which // len(KINDS)]
            lag = timedelta(seconds=lags[i] if lags else 0)
            run.verdict(_verdict(kind, scope, ts - lag, False, 1.0))
        run.tick(ts)
    run._publish(run.correlator.flush())
    return run


def _episodes(
    keys: list[int], episodes: list[tuple[int, int, int, int, float, bool]], normal_every: int
) -> list[Step]:
    """The episodes as steps of one verdict each, in time order."""
    points: list[tuple[int, int, bool, float, bool]] = []
    end = 0
    for pick, start, minutes, every, size, resumes in episodes:
        at = start * 60
        while at <= (start + minutes) * 60:
            points.append((at, pick, True, size, resumes))
            at += every
        end = max(end, at)
    if normal_every:
        for at in range(0, end, normal_every):
            points += [(at, pick, False, 1.0, False) for pick in range(len(keys))]
    points.sort(key=lambda p: p[0])
    steps, before = [], 0
    for at, pick, anomalous, size, resumes in points:
        steps.append((pick, 1, max(at - before, 0), anomalous, size, resumes))
        before = at
    return steps


def _check(run: Run) -> None:
    s = run.s
    made = Counter(r["event_id"] for r in run.made)
    published = Counter(r["event_id"] for r in run.published)
    assert all(n == 1 for n in made.values())
    lost = [r["message"] for r in run.made if published[r["event_id"]] == 0]
    assert not lost, lost
    twice = [r["message"] for r in run.published if published[r["event_id"]] > 1]
    assert not twice, twice
    assert set(published) <= set(made)
    # per key: firing, resolved, firing, ...; a cooldown between a resolve and the next firing;
    # between a firing and its resolve at most one update, more severe (``severity_raised_from``)
    by_key: dict[str, list[dict[str, Any]]] = {}
    updates: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in run.made:
        records = by_key.setdefault(r["alert_key"], [])
        if "severity_raised_from" in r["details"]:
            assert records and records[-1]["status"] == "firing", r["message"]
            updates.setdefault(r["alert_key"], []).append((len(records) - 1, r))
        else:
            records.append(r)
    for key, records in by_key.items():
        statuses = [r["status"] for r in records]
        assert statuses == ["firing", "resolved"] * (len(records) // 2), (key, statuses)
        for resolved, again in zip(records[1::2], records[2::2], strict=False):
            assert again["ts"] - resolved["ts"] >= timedelta(seconds=s.cooldown_seconds), key
        for fired, resolved in zip(records[::2], records[1::2], strict=True):
            assert fired["ts"] <= resolved["ts"], key
    # a firing and its resolve are published in the same incident
    incident = {r["event_id"]: r["incident_key"] for r in run.published}
    for key, records in by_key.items():
        for fired, resolved in zip(records[::2], records[1::2], strict=True):
            assert incident[fired["event_id"]] == incident[resolved["event_id"]], key
    for key, raised in updates.items():
        at = [i for i, _ in raised]
        assert len(at) == len(set(at)), (key, "two updates of one incident")
        for i, update in raised:
            fired = by_key[key][i]
            assert _SEVERITY.index(update["severity"]) > _SEVERITY.index(fired["severity"]), key
            assert incident[update["event_id"]] == incident[fired["event_id"]], key
    for target in (PAGER, COSTS, CRITICAL_COSTS, EVERYTHING):
        _check_pager(run, by_key, updates, target)
    for target in (PAGER, EVERYTHING):
        _check_receivers(run, by_key, updates, target)
    assert not run.hidden, [(r["message"], r["incident_key"]) for r in run.hidden]
    assert not run.manager.firing
    assert not run.correlator.groups, [g.key for g in run.correlator.groups]
    assert not run.correlator.by_key
    open_pages = {k: r["message"] for k, r in run.primary.items() if r["status"] != "resolved"}
    assert not open_pages, open_pages


_SEVERITY = ("info", "warning", "critical")
PAGER = AlertTarget(name="pager", url="http://127.0.0.1:9/pager", min_severity="critical")
EVERYTHING = AlertTarget(name="all", url="http://127.0.0.1:9/all")
COSTS = AlertTarget(name="costs", url="http://127.0.0.1:9/costs", kinds=("cost_per_request",))
CRITICAL_COSTS = AlertTarget(
    name="critical-costs",
    url="http://127.0.0.1:9/cc",
    kinds=("cost_per_request",),
    min_severity="critical",
)


def _check_pager(
    run: Run,
    by_key: dict[str, list[dict[str, Any]]],
    updates: dict[str, list[tuple[int, dict[str, Any]]]],
    target: AlertTarget,
) -> None:
    """A target with filters (severity, kinds) hears of every incident with a firing record
    its filters let through, at its first one (``incident_heard_before``), and of the end of
    what it was paged."""
    paged = {
        r["event_id"] for r in run.published if target.accepts(r) and target.declines(r) is None
    }
    heard = {r["incident_key"] for r in run.published if r["event_id"] in paged}
    wanted = {
        r["incident_key"] for r in run.published if r["status"] == "firing" and target.accepts(r)
    }
    assert wanted <= heard, (target.name, wanted - heard)
    for key, records in by_key.items():
        raised = dict(updates.get(key, []))
        for i in range(0, len(records), 2):
            fired = [records[i]] + ([raised[i]] if i in raised else [])
            if any(r["event_id"] in paged for r in fired):
                assert records[i + 1]["event_id"] in paged, (key, records[i + 1]["message"])


def _check_receivers(
    run: Run,
    by_key: dict[str, list[dict[str, Any]]],
    updates: dict[str, list[tuple[int, dict[str, Any]]]],
    target: AlertTarget,
) -> None:
    """What PagerDuty and Alertmanager behind ``target`` show: a resolve closes the alert of
    its ``dedup_key`` (of its labels), so it must close only lifecycles that are over (a
    recurrence paged while the earlier incident's page waited for its members shared the
    earlier one's PagerDuty alert, and that page's resolve closed the recurrence that still
    went on)."""
    lifecycle: dict[str, tuple[str, int]] = {}  # event id -> (alert key, its firing's index)
    for key, records in by_key.items():
        for i, r in enumerate(records):
            lifecycle[r["event_id"]] = (key, i - i % 2)
        for i, update in updates.get(key, []):
            lifecycle[update["event_id"]] = (key, i)
    ended: set[tuple[str, int]] = set()
    triggered: dict[object, set[tuple[str, int]]] = {}  # receiver's key -> lifecycles it pages
    for r in run.published:
        if r["status"] == "resolved":
            ended.add(lifecycle[r["event_id"]])
        if not (target.accepts(r) and target.declines(r) is None):
            continue
        event = pagerduty_payload(r, "key")
        opened = [("pagerduty", event["dedup_key"])] if event["event_action"] == "trigger" else []
        closed = [] if opened else [("pagerduty", event["dedup_key"])]
        for entry in alertmanager_payload(r):
            labels = ("alertmanager", frozenset(entry["labels"].items()))
            (closed if "endsAt" in entry else opened).append(labels)
        for receiver_key in opened:
            triggered.setdefault(receiver_key, set()).add(lifecycle[r["event_id"]])
        for receiver_key in closed:
            # (a resolve of an alert a receiver never got is nothing there: Alertmanager is
            # sent both label sets of an alert whose severity rose, and a reopened incident's
            # last word is its resolve, though its reopening paged no one)
            going_on = triggered.pop(receiver_key, set()) - ended
            assert not going_on, (target.name, receiver_key[0], r["message"], going_on)
    # and every alert a receiver was sent is resolved there in the end (probe 57's D1: the
    # incident's resolve came under a key never triggered, the page's was resolved early)
    assert not triggered, (target.name, triggered)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(KEY_SETS, st.lists(STEP, min_size=1, max_size=30))
def test_any_verdict_stream_keeps_the_lifecycles_and_incidents_invariants(
    keys: list[int], steps: list[Step]
) -> None:
    _check(_play(keys, steps))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(KEY_SETS, st.lists(EPISODE, min_size=1, max_size=6), NORMAL_EVERY)
def test_overlapping_incidents_keep_the_invariants(
    keys: list[int], episodes: list[tuple[int, int, int, int, float, bool]], normal_every: int
) -> None:
    _check(_play(keys, _episodes(keys, episodes, normal_every)))


# A key's verdicts behind the ticks: on time, 10 minutes, an hour, three hours.
LAGS = st.lists(st.sampled_from([0, 0, 600, 3600, 3 * 3600]), min_size=4, max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(KEY_SETS, st.lists(EPISODE, min_size=1, max_size=6), NORMAL_EVERY, LAGS)
def test_keys_whose_verdicts_come_late_keep_the_invariants_on_their_own_clocks(
    keys: list[int],
    episodes: list[tuple[int, int, int, int, float, bool]],
    normal_every: int,
    lags: list[int],
) -> None:
    """History replayed into a live agent: the engine judges late records' cost at their own
    event time, behind the minutes it ticks (a review's case: a user at 12x for 40 minutes
    300 s behind resolved "back to normal" after 3 minutes and fired again within its
    cooldown)."""
    _check(_play(keys, _episodes(keys, episodes, normal_every), lags=lags))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    KEY_SETS,
    st.lists(EPISODE, min_size=1, max_size=6),
    NORMAL_EVERY,
    st.integers(1, 40),
)
def test_the_invariants_hold_across_restarts_from_checkpoints(
    keys: list[int],
    episodes: list[tuple[int, int, int, int, float, bool]],
    normal_every: int,
    every: int,
) -> None:
    _check(_play(keys, _episodes(keys, episodes, normal_every), restart_every=every))


# -- what the properties found (each failed before its fix) ---------------------------------
def _key(scope: str, kind: str) -> int:
    return SCOPES.index(scope) * len(KINDS) + KINDS.index(kind)


def test_a_pages_resolve_held_for_another_member_is_published_when_the_incident_ends() -> None:
    """A user's loop paged; its resolve held while its feature's surge went on; the loop came
    back after its cooldown, joined the same incident and resolved again: the second resolve
    took the first's place in the hold, and the first was never published (a record lost).
    Then the first went out as the loop came back, as the page's (``resolves_page``): it closed
    the page on the pager while the surge went on (probe 57's D1). It is the page's resolve
    when the incident ends; the loop's second lifecycle is a member's, firing and resolve."""
    keys = [_key("user:u1", "volume_spike"), _key("feature:a", "volume_spike")]
    steps: list[Step] = [
        (0, 1, 1, True, 40.0, False),
        (1, 1, 5, True, 12.0, False),
        *[(1, 8, 120, True, 12.0, False)] * 4,  # the feature's surge goes on for an hour
        (0, 1, 60, True, 40.0, False),  # the loop again, after its cooldown
        (1, 8, 120, True, 12.0, False),
        (0, 1, 60, True, 40.0, False),
    ]
    run = _play(keys, steps)
    loop = [r for r in run.published if r["alert_key"] == "volume_spike|user:u1"]
    assert [(r["status"], r["incident_role"]) for r in loop] == [
        ("firing", "primary"),
        ("firing", "related"),
        ("resolved", "related"),
        ("resolved", "primary"),
    ], [(r["status"], r["incident_role"]) for r in loop]
    assert loop[3]["first_seen"] == loop[0]["first_seen"]  # the page's own lifecycle
    assert "resolves_page" not in loop[2]["details"]
    surge = [r for r in run.published if r["alert_key"] == "volume_spike|feature:a"]
    assert run.published.index(surge[-1]) < run.published.index(loop[3])
    _check(run)


def test_a_recurrence_does_not_join_a_reopened_incident_on_call_heard_closed() -> None:
    """The global rate paged and resolved, anomalous on and off through its cooldown; a
    feature's cost incident, closed by silence, reopened as `related` (not paged: its close
    said its cost was not seen back to normal). The global's recurrence joined that incident
    as `related`, and on-call's last word on the global stayed "back to normal"."""
    keys = [_key("feature:a", "cost_per_request"), _key("global", "volume_spike")]
    episodes = [(0, 0, 1, 10, 2.0, False), (0, 31, 45, 10, 2.0, True), (1, 17, 45, 890, 2.0, False)]
    run = _play(keys, _episodes(keys, episodes, 0))
    again = [
        r
        for r in run.published
        if r["alert_key"] == "volume_spike|global" and r["details"].get("recurring") == "true"
    ]
    assert again and again[0]["status"] == "firing", again
    assert again[0]["incident_role"] == "primary", again[0]
    _check(run)


def test_a_critical_alert_after_an_incidents_page_resolved_pages() -> None:
    """A feature's cost incident paged and resolved; a user at 2x (a weak member that joined
    after the page) kept it open. Another user's cost went to 12x a minute later: it joined
    that incident through the feature as `related` and was never paged, for 33 minutes."""
    keys = [
        _key("feature:a", "cost_per_request"),
        _key("user:u1", "cost_per_request"),
        _key("user:u3", "cost_per_request"),
    ]
    episodes = [
        (0, 0, 10, 30, 4.0, False),
        (1, 2, 60, 30, 2.0, False),
        (2, 14, 30, 30, 12.0, False),
    ]
    run = _play(keys, _episodes(keys, episodes, 60))
    fired = [
        r
        for r in run.published
        if r["alert_key"] == "cost_per_request|user:u3" and r["status"] == "firing"
    ]
    assert fired and fired[0]["incident_role"] == "primary", fired
    # the weak user that joined after the page still trails it, as before
    weak = [r for r in run.published if r["alert_key"] == "cost_per_request|user:u1"]
    assert weak and all(r["incident_role"] == "related" for r in weak), weak
    _check(run)


def test_a_pages_resolve_held_for_another_member_is_published_when_its_incident_ends() -> None:
    """The same on the reopen path (a review's case): a feature's cost page closed by silence,
    its resolve held while the global rate it took in went on; the feature's calls came back
    still drifted (reopened) and resolved again; the first resolve was never published. It is
    the page's resolve, when the incident ends (not when the page's key reopens)."""
    keys = [_key("feature:a", "cost_per_request"), _key("global", "volume_spike")]
    episodes = [(0, 0, 14, 30, 2.0, False), (1, 10, 95, 60, 2.0, False), (0, 75, 15, 30, 2.0, True)]
    run = _play(keys, _episodes(keys, episodes, 0))
    cost = [r for r in run.published if r["alert_key"] == "cost_per_request|feature:a"]
    assert [(r["status"], r["incident_role"]) for r in cost] == [
        ("firing", "primary"),
        ("firing", "related"),
        ("resolved", "related"),
        ("resolved", "primary"),
    ], cost
    assert cost[3]["details"]["resolved_by"] == "silence", cost[3]
    assert cost[3]["first_seen"] == cost[0]["first_seen"]
    _check(run)


def test_a_reopened_incident_paged_again_by_an_escalation_takes_its_critical_members() -> None:
    """A reopened cost incident escalated by its feature's rate (a page again, open): a user's
    critical loop of that feature joins it, as it joins any open page (a review's case: the
    reopen mark was kept, and the loop paged a second incident)."""
    keys = [
        _key("feature:a", "cost_per_request"),
        _key("feature:a", "volume_spike"),
        _key("user:u1", "volume_spike"),
    ]
    episodes = [
        (0, 0, 14, 30, 2.0, False),
        (0, 75, 15, 30, 2.0, True),
        (1, 78, 10, 30, 8.0, False),
        (2, 80, 5, 30, 40.0, False),
    ]
    run = _play(keys, _episodes(keys, episodes, 0))
    escalated = [r for r in run.published if "escalated_from" in r["details"]]
    assert escalated, "the rate's money escalates the reopened incident"
    loop = [
        r
        for r in run.published
        if r["alert_key"] == "volume_spike|user:u1" and r["status"] == "firing"
    ]
    assert loop and loop[0]["incident_role"] == "related", loop
    assert loop[0]["incident_key"] == escalated[0]["incident_key"]
    _check(run)


def test_a_recurrence_does_not_take_the_key_of_an_open_reopened_incident() -> None:
    """The global rate, a member of a feature's cost incident, recurs while that incident,
    closed by silence, is reopened under its key: the recurrence pages under a key of its
    own (a review's case: both open under one key, the feature's resolve went out as the
    incident's while the global still fired)."""
    keys = [_key("feature:a", "cost_per_request"), _key("global", "volume_spike")]
    episodes = [
        (0, 0, 14, 30, 2.0, False),
        (1, 10, 33, 60, 2.0, False),
        (1, 50, 60, 600, 2.0, False),
        (0, 75, 15, 30, 2.0, True),
    ]
    run = _play(keys, _episodes(keys, episodes, 0))
    again = [
        r
        for r in run.published
        if r["alert_key"] == "volume_spike|global" and r["details"].get("recurring") == "true"
    ]
    reopened = [r for r in run.published if r["details"].get("reopened") == "true"]
    assert again and reopened
    assert again[0]["incident_role"] == "primary"
    assert again[0]["incident_key"] != reopened[0]["incident_key"]
    _check(run)


def test_a_pages_resolve_does_not_close_its_keys_recurrence_on_the_pager() -> None:
    """The global rate paged with the global cost attached; the rate recurred 33 minutes
    later and paged (its own incident) while the first page still waited for the cost
    member. The first page's resolve then went to PagerDuty under the bare alert key, which
    the recurrence's trigger had used too: PagerDuty showed the recurrence resolved for the
    20 minutes it still went on (Alertmanager, knowing alerts by the same labels, too)."""
    keys = [_key("global", "volume_spike"), _key("global", "cost_per_request")]
    episodes = [(0, 0, 45, 400, 2.0, False), (1, 0, 5, 10, 2.0, False)]
    run = _play(keys, _episodes(keys, episodes, 0))
    rate = [
        (r["status"], r["incident_key"])
        for r in run.published
        if r["alert_key"] == "volume_spike|global" and r["incident_role"] == "primary"
    ]
    first, again = rate[0][1], rate[1][1]
    assert rate == [
        ("firing", first),
        ("firing", again),
        ("resolved", first),
        ("resolved", again),
    ], rate
    _check(run)
