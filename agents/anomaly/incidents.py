"""One incident, one page: alerts of nested scopes that fire together are correlated.

Owns grouping ``firing`` alerts into incidents and choosing which one pages. A user's
runaway loop moves the user's, their feature's and the global request rate at once;
a prompt injection moves a feature's cost and, through it, the global cost. Those are
one incident, and on-call should get one page naming the narrowest scope that
explains it, with the others attached.

- **Grouping.** A firing alert joins an open incident that saw an alert within
  ``incident_window_seconds`` when its scope nests with one of the incident's narrower
  members (the same scope, or a user and a feature the user called recently), and an
  incident at any age whose member of the same kind and nesting scope is still firing; a
  ``global`` alert joins the latest open incident, and a narrower alert joins an incident
  that is only a global alert still in its hold. So a user's loop after a global surge was
  paged, or two users' loops, are separate pages.
- **Holding.** A new incident holds its page for ``incident_hold_seconds`` of event
  time so the alerts of the same moment can join; then one alert pages
  (``incident_role="primary"``) and every member is published with the same
  ``incident_key`` (the others as ``related``; the page's message and details list them).
  Alerts that join later are published as related at once. An incident of features'
  request-rate alerts alone that no user could be named for (none holds
  ``incident_spread_share`` of the feature's extra spend: a viral surge) pages at once.
- **The narrowest scope that explains it.** Starting from the widest member, the page
  moves to a nested member that accounts for at least ``incident_explain_share`` of the
  wider one's extra spend over the last minutes (the engine measures it when the hold
  ends): a user whose loop is most of their feature's surge, not one of many users of
  a feature whose cost shifted.
- **Resolving.** Each member's ``resolved`` record is published as it comes; the
  page's own resolve is held until every member of the incident has resolved, but for a
  weak late one: narrower than the page's scope, joined after the page went out, and not
  critical. Users' cost alarms that fire as their feature's ends (the evidence of the
  spike they gathered while the feature's alarm absorbed them; 1.5x and 2.5x, their calls
  ordinary) held a feature's page open 16 min after the spike (probe W). Such a member is
  still published, as related, and its resolve too.
- **One money figure.** A member of the page's scope that joins after the page with more
  money at stake says it is the incident's money, next to the page's figure; the page's
  resolve states the incident's peak money as best known (the largest of its scope's
  members: a routing regression paged at "$0.31/hour" from the tier mix while its cost
  alert said "$0.99/hour", probe W).
- **Reopening.** A member closed by its scope's silence (``resolved_by=silence``) whose
  lifecycle reopens it (``details.reopened``: its cost alarm fired again in the calls back,
  before they were seen normal) rejoins the same incident, published as ``related``: no
  second page for one incident through a night (issue 12).
- **Recurring.** A member that fires again as its cooldown ends, anomalous all through it
  (``details.recurring``: bursts every 10 minutes for an hour), and that no open incident
  takes, opens its incident again under the same ``incident_key`` and pages: the page said
  "back to normal", and on-call must hear it is not (the message says so). An incident
  whose page has resolved (a weaker member keeps it open) does not take it: attached there,
  it would be ``related``, never delivered.
- **News after the page's resolve.** An incident whose page has resolved (a weak member keeps
  it open), or that was reopened unpaged after its page closed for want of calls, takes no
  critical alert either: it opens an incident of its own and pages. A user's cost at 12x,
  a minute after their feature's page resolved, joined it through the feature as
  ``related`` and was never paged; a recurring global rate joined a reopened cost incident
  the same way (both found by the lifecycle's property test). Weak alerts still trail it.
- **Severity rises.** A member's update (the lifecycle's ``details.severity_raised_from``:
  its incident became critical) waits for the page before it, is ``related`` in an open
  page, and pages as an escalation in an incident on-call last heard was over. Every firing
  record published says how severe the incident's firing records were before it
  (``details.incident_severity_before``), and a member's resolve what its first firing
  record said: a target whose ``min_severity`` none of them passed is paged by the first
  that does (the notifier's rule), and by that member's resolve.
- **A page that fires again while its resolve waits** for the other members: that is a new
  lifecycle of its key (the notifier's ``lifecycle_key``), a member (``related``, firing and
  resolve); the page's held resolve, under the key that paged, goes out when the incident is
  over (probe 57: published as the key fired again, it closed a feature's drift page 2.5
  hours early, and the next lifecycle's resolve ended the incident under a key never paged).

Event time only. It does not own alert lifecycles per key (:mod:`agents.anomaly.alerting`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agents.anomaly.core import duration_text, money_per_hour, with_lead
from app.alerts_config import (
    ANY_KIND,
    DEFAULT_SEVERITY,
    INCIDENT_HEARD_BEFORE,
    INCIDENT_SEVERITY_BEFORE,
    NO_SEVERITY,
    RAISED_HEARD_BEFORE,
    RESOLVES_PAGE,
    SEVERITY_PUBLISHED,
    SEVERITY_RAISED_FROM,
    heard_text,
    severity_rank,
)
from app.anomaly_config import DetectorSettings

Nests = Callable[[str, str], bool]
Explains = Callable[[str, str, datetime], bool]
Refresh = Callable[[dict[str, Any]], dict[str, Any]]
Quiet = Callable[[str], bool]
Building = Callable[[str, datetime], bool]
Spread = Callable[[str, datetime], bool]
Calls = Callable[[str, str, datetime], bool]


def specificity(scope: str) -> int:
    """0 for global, 1 for a feature (or team, key), 2 for a user."""
    if scope == "global":
        return 0
    return 2 if scope.startswith("user:") else 1


@dataclass
class Group:
    """An incident: its alerts (by key) and whether its page went out."""

    key: str
    opened: datetime
    last_activity: datetime
    members: dict[str, dict[str, Any]] = field(default_factory=dict)  # firing records by key
    resolved: set[str] = field(default_factory=set)
    primary: str = ""
    paged: bool = False
    held_resolve: dict[str, Any] | None = None
    # (Plain defaults: they are class attributes, so checkpoints from before them restore.)
    page_members: frozenset[str] | None = None  # the members when the page went out
    page_resolved: bool = False  # the page's resolve went out (members may still be open)
    # Opened again by a reopen (``_reopen``) after its page's silence close: not paged again,
    # so on-call's last word on it is that close.
    reopened: bool = False
    peaks: dict[str, float] | None = None  # members' peak money at stake, by key
    # Members' severity updates that came before the page: published right after it.
    pending: list[dict[str, Any]] | None = None
    # The highest severity of the firing records published so far ("none"), and per member
    # what it was before the member's first firing record (its resolve goes where that went).
    notified: str = NO_SEVERITY
    first_before: dict[str, str] | None = None
    paged_keys: frozenset[str] = frozenset()  # members ever published as its page
    # The same per lifecycle (``_life``: a key and when it first fired), as the notifier's
    # ``lifecycle_key`` knows them; None: a checkpoint from before (``paged_keys``'s).
    paged_lives: frozenset[str] | None = None
    # The lifecycle of the page (``_life``); "": a checkpoint from before (the primary's any).
    page_life: str = ""
    # The same by kind (a target may hear only some kinds): the highest severity of each
    # kind published so far (None: a checkpoint from before, ``notified`` for every kind),
    # and per member what it was before the member's first firing record.
    heard: dict[str, str] | None = None
    first_heard: dict[str, str] | None = None
    # Per member whose severity rose: what was heard before its update ("" when the update
    # was the page); its resolve says so (``raised_heard_before``), so it goes where the
    # update went, not to a target that neither its firing nor its update paged.
    raised_heard: dict[str, tuple[str, str]] | None = None  # (first's severity, heard)
    first_severity: dict[str, str] | None = None  # per member, its first firing record's
    # Pages at once, without the hold: features' request-rate alerts alone, whose extra
    # spend no user could be named for (``Correlator._spread``; as of its last member).
    spread: bool = False

    def heard_so_far(self) -> dict[str, str]:
        if self.heard is not None:
            return self.heard
        return {} if self.notified == NO_SEVERITY else {ANY_KIND: self.notified}


class Correlator:
    """Firing/resolved alert records in; the same records out, grouped and marked."""

    def __init__(
        self,
        settings: DetectorSettings,
        nests: Nests,
        explains: Explains,
        refresh: Refresh | None = None,
        quiet: Quiet | None = None,
        building: Building | None = None,
        spread: Spread | None = None,
        calls: Calls | None = None,
    ) -> None:
        self.settings = settings
        self.nests: Nests | None = nests
        self.explains: Explains | None = explains
        # A held member's record as of the page (its latest figures); None: as it fired.
        self.refresh: Refresh | None = refresh
        # Whether an open member has gone quiet (a cost incident held open through its
        # scope's silence, which the lifecycle once resolved); None: none has.
        self.quiet: Quiet | None = quiet
        # Whether a user's feature has cost evidence building (its alert may come soon).
        self.building: Building | None = building
        # Whether no user holds enough of a feature's extra spend to name its page.
        self.spread: Spread | None = spread
        # Whether a user calls a feature now (``incident_volume_feature_seconds``); None: a
        # user is taken to call every feature it nests with.
        self.calls: Calls | None = calls
        self.groups: list[Group] = []
        self.by_key: dict[str, Group] = {}  # alert key -> its open group
        # Alert key -> the incident key it was in when it resolved by silence: a reopen of
        # that key (the lifecycle's ``reopened`` firing) rejoins the same incident.
        self.closed_silent: dict[str, str] = {}
        # ... and how severe that incident's published records were (a reopen pages no one)
        self.silent_notified: dict[str, str] = {}
        self.silent_heard: dict[str, dict[str, str]] = {}
        # Alert key -> the incident key it was in when it last resolved, and when: a
        # ``recurring`` firing of that key that no open incident takes pages under that key.
        self.closed_recent: dict[str, tuple[str, datetime]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["nests"] = state["explains"] = None  # the engine's; handed in again on restore
        state["refresh"] = state["quiet"] = state["building"] = state["spread"] = None
        state["calls"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("quiet", None)  # a checkpoint from before them
        self.__dict__.setdefault("building", None)
        self.__dict__.setdefault("spread", None)
        self.__dict__.setdefault("calls", None)
        self.__dict__.setdefault("closed_silent", {})
        self.__dict__.setdefault("silent_notified", {})
        self.__dict__.setdefault("silent_heard", {})
        for group in self.groups:
            if "notified" not in group.__dict__ and group.paged:
                # a checkpoint from before severities were followed: every member of a paged
                # incident was published, so they say what its targets have heard
                group.notified = max(
                    (str(m.get("severity", DEFAULT_SEVERITY)) for m in group.members.values()),
                    key=severity_rank,
                    default=DEFAULT_SEVERITY,
                )
        self.__dict__.setdefault("closed_recent", {})

    def process(self, alerts: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
        """Alerts to publish, given new lifecycle ``alerts`` at event time ``now``."""
        out: list[dict[str, Any]] = []
        for alert in alerts:
            if alert["status"] == "firing" and SEVERITY_RAISED_FROM in alert.get("details", {}):
                out += self._raised(alert)
            elif alert["status"] == "firing":
                out += self._firing(alert)
            else:
                out += self._resolved(alert)
        out += self.tick(now)
        return out

    def _nests(self, a: str, b: str) -> bool:
        return a == b if self.nests is None else self.nests(a, b)

    def _live(self, group: Group, key: str) -> bool:
        """Whether member ``key`` is open and not quiet: a cost incident held open
        through its scope's silence keeps its own page, but takes no other alert (probe T:
        quiet users' cost incidents held open took in their features' later incidents)."""
        return key not in group.resolved and (self.quiet is None or not self.quiet(key))

    def tick(self, now: datetime) -> list[dict[str, Any]]:
        """Pages of incidents whose hold has passed at ``now``."""
        hold = timedelta(seconds=self.settings.incident_hold_seconds)
        out: list[dict[str, Any]] = []
        for group in self.groups:
            if (
                not group.paged
                and (group.spread or now - group.opened >= hold)
                and not self._waits(group, now)
            ):
                out += self._page(group, now)
        return out

    def _waits(self, group: Group, now: datetime) -> bool:
        """Whether an incident of users' cost alerts waits for a feature's alert to join
        (``incident_cost_wait_seconds``): one of their features has cost evidence building.
        A user's own shift pages at once unless it also moves a feature's cost, and then
        the feature's alert joins and the page names the user (``_explains``)."""
        wait = timedelta(seconds=self.settings.incident_cost_wait_seconds)
        return (
            self.building is not None
            and now - group.opened < wait
            and all(
                m["kind"] == "cost_per_request" and specificity(m["scope"]) == 2
                for m in group.members.values()
            )
            and any(self.building(m["scope"], now) for m in group.members.values())
        )

    def _spread(self, group: Group, now: datetime) -> bool:
        """Whether the held ``group`` pages without waiting out the hold: its members are
        all request-rate alerts of features, and for each no user who called it holds
        ``incident_spread_share`` of its extra spend (so none can be named for it)."""
        return (
            self.spread is not None
            and all(
                m["kind"] == "volume_spike" and specificity(m["scope"]) == 1
                for m in group.members.values()
            )
            and all(self.spread(m["scope"], now) for m in group.members.values())
        )

    def flush(self) -> list[dict[str, Any]]:
        """Every held page now (end of a finite stream)."""
        out: list[dict[str, Any]] = []
        for group in self.groups:
            if not group.paged:
                out += self._page(group, group.last_activity)
        return out

    # -- firing -----------------------------------------------------------------------------
    def _firing(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        ts: datetime = alert["ts"]
        closed = self.closed_silent.pop(alert["alert_key"], None)
        notified = self.silent_notified.pop(alert["alert_key"], "critical")
        heard = self.silent_heard.pop(alert["alert_key"], None)
        recent = self.closed_recent.pop(alert["alert_key"], None)
        if closed is not None and alert["details"].get("reopened") == "true":
            return self._reopen(alert, closed, notified, heard)
        recurring = alert["details"].get("recurring") == "true"
        old_key = recent[0] if recent is not None and recurring else None
        group = next((g for g in reversed(self.groups) if self._takes(g, alert)), None)
        news = old_key is not None or alert.get("severity") == "critical"
        if group is not None and news and _page_over(group):
            # Its page said "back to normal" (a weaker member keeps it open), or it was closed
            # for want of calls and reopened unpaged: attached there, a recurrence or a
            # critical alert would be `related`, never delivered; it is news.
            group = None
        out = self._release_held(group, alert) if group is not None else []
        if group is None:
            key = _incident_key(alert)
            if old_key is not None and all(
                g.key != old_key or g.page_resolved for g in self.groups
            ):
                key = old_key  # the incident it resolved from, going on (no open page has it)
            group = Group(key=key, opened=ts, last_activity=ts)
            self.groups.append(group)
        group.members[alert["alert_key"]] = alert
        group.resolved.discard(alert["alert_key"])  # firing again: open until it resolves
        group.last_activity = max(group.last_activity, ts)
        self.by_key[alert["alert_key"]] = group
        if not group.paged:
            group.spread = self._spread(group, ts)
        if group.paged:
            alert = self._next_to_page(alert, group)
            if self._escalates(alert, group):
                return out + self._escalate(alert, group)
            return [*out, self._mark(alert, group, "related")]
        return out

    def _raised(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        """A member's update: its incident became more severe than it fired. Before the page,
        it waits for it (the page, refreshed, states the severity too); in an open page it is
        a member's record (``related``; a target the page's severity did not reach gets it,
        see ``_mark``); in an incident on-call last heard was over, it is news: the incident
        pages again, escalated (a user at 2x kept a feature's resolved page open, went to
        12x, and was never paged)."""
        key = alert["alert_key"]
        group = self.by_key.get(key)
        if group is None or key not in group.members:
            return self._firing(alert)  # (a group lost to a checkpoint from before updates)
        group.last_activity = max(group.last_activity, alert["ts"])
        if not group.paged:
            group.pending = [*(group.pending or []), alert]
            return []
        if _page_over(group) and not any(
            g is not group and g.key == group.key and not g.page_resolved for g in self.groups
        ):
            group.members[key] = alert
            return self._escalate(alert, group)
        # Critical now, it holds the page's resolve (``_trails``); its figures stay those
        # published (a later escalation by money compares with what the page said).
        group.members[key] = {**group.members[key], "severity": alert["severity"]}
        return [self._mark(alert, group, "related")]

    def _release_held(self, group: Group, alert: dict[str, Any]) -> list[dict[str, Any]]:
        """The page fires (or reopens) again while its resolve waits for the other members:
        that is a new lifecycle of its key (the notifier's ``lifecycle_key``), a member like
        any other, and the page's resolve stays held until the incident is over. Published
        then as a member's resolve (``resolves_page``), it closed the page on the pager while
        the rest of the incident went on (probe 57's D1: a feature's drift paged as its
        heaviest user, "resolved" when the user fired again, 2.5 hours before the drift
        ended), and the next lifecycle's resolve came as the page's, under a key never
        triggered. Only a checkpoint from before lifecycles were followed releases it."""
        held = group.held_resolve
        if held is None or held["alert_key"] != alert["alert_key"] or group.page_life:
            return []
        return self._publish_held(group)

    def _publish_held(self, group: Group) -> list[dict[str, Any]]:
        """The page's held resolve, published as a member's (``related``): the incident's
        page is now another record (the same key firing again, or an escalation)."""
        held = group.held_resolve
        if held is None or group.page_resolved:
            return []
        group.held_resolve = None
        return [self._mark(held, group, "related")]

    def _escalates(self, alert: dict[str, Any], group: Group) -> bool:
        """Whether ``alert``, joining after the page, pages as its update: of the page's own
        scope, with money at stake, at least ``incident_escalate_ratio`` times the money the
        page stated, while the page is not yet resolved (an update after the page's resolve
        would read as the incident reopening; session 25's review). A page that stated $0
        escalates for the first alert with money, not for every later one."""
        ratio = self.settings.incident_escalate_ratio
        page = group.members.get(group.primary)
        if (
            ratio <= 0
            or page is None
            or page is alert
            or group.page_resolved
            or page["scope"] != alert["scope"]
        ):
            return False
        mine, stated = alert.get("impact_usd_per_hour"), page.get("impact_usd_per_hour")
        return (
            mine is not None
            and stated is not None
            and abs(mine) > 0
            and abs(mine) >= ratio * abs(stated)
        )

    def _escalate(self, alert: dict[str, Any], group: Group) -> list[dict[str, Any]]:
        """The alert becomes the incident's page, published as ``primary`` (an update of the
        same incident: paging targets hear of it); the page before it is a member like any
        other, and the incident's resolve is the new page's (probe H's D8)."""
        before = group.primary
        # the earlier page had resolved, waiting for the others: its resolve is a member's
        out = self._publish_held(group)
        group.primary = alert["alert_key"]
        group.page_life = _life(alert)
        group.page_members = (group.page_members or frozenset()) | {alert["alert_key"]}
        group.page_resolved = group.reopened = False  # paged again: its page is open
        others = [k for k in group.members if k != group.primary]
        escalated = {
            **alert,
            "message": with_lead("escalated", alert["message"]),
            "details": {**alert["details"], "escalated_from": before},
        }
        out.append(self._mark(escalated, group, "primary", others))
        return out

    def _next_to_page(self, alert: dict[str, Any], group: Group) -> dict[str, Any]:
        """A member of the page's scope that joins after the page with more money at stake
        than the page stated: its message says it is the incident's money, next to the
        page's figure (one incident, and on-call is not left with two figures unexplained)."""
        page = group.members.get(group.primary)
        if page is None or page is alert or page["scope"] != alert["scope"]:
            return alert
        mine, stated = alert.get("impact_usd_per_hour"), page.get("impact_usd_per_hour")
        if mine is None or stated is None or abs(mine) <= abs(stated):
            return alert
        what = page["kind"].replace("_", " ")
        return {
            **alert,
            "message": (
                f"{alert['message']}; the incident paged as {what} for {page['scope']} "
                f"(fired {page['ts']:%H:%M:%S} UTC) stated {money_per_hour(stated)}: this "
                f"is its money as its {alert['kind'].replace('_', ' ')} measures it now"
            ),
            "details": {**alert["details"], "page_impact_usd_per_hour": f"{stated:.4g}"},
        }

    def _reopen(
        self, alert: dict[str, Any], key: str, notified: str, heard: dict[str, str] | None
    ) -> list[dict[str, Any]]:
        """A cost incident closed by silence whose alarm fired again in the calls back, not
        seen normal in between (issue 12): the same incident, published with its key as
        ``related`` (no new page: it was paged, and its close said the cost was not seen
        back to normal). Its resolve is the incident's (``primary``); alerts of its users
        join it as they join any open incident."""
        ts: datetime = alert["ts"]
        group = next((g for g in self.groups if g.key == key), None)
        if group is None:
            group = Group(key=key, opened=ts, last_activity=ts, primary=alert["alert_key"])
            group.paged = group.reopened = True
            group.notified = notified  # what its targets heard of it before the silence
            group.heard = heard  # (None, from a checkpoint before kinds: ``notified``'s)
            self.groups.append(group)
        out = self._release_held(group, alert)
        group.members[alert["alert_key"]] = alert
        group.resolved.discard(alert["alert_key"])
        group.last_activity = max(group.last_activity, ts)
        self.by_key[alert["alert_key"]] = group
        return [*out, self._mark(alert, group, "related")]

    def _takes(self, g: Group, alert: dict[str, Any]) -> bool:
        """Whether open incident ``g`` takes the firing ``alert``. Only through members that
        are live: an incident whose members have all gone quiet takes nothing."""
        if not any(self._live(g, k) for k in g.members):
            return False
        ts: datetime = alert["ts"]
        scope = alert["scope"]
        window = timedelta(seconds=self.settings.incident_window_seconds)
        if ts - g.last_activity <= window and (
            # The global scope belongs to any incident; a narrower alert joins an incident
            # with a narrower member it nests with (two users' loops, or a loop after a
            # global surge was paged, stay separate pages), or one that is only a global
            # alert still in its hold (the same moment: a feature's regression moves the
            # global share 3 s before its own).
            scope == "global"
            or any(self._joins_through(g, alert, m) for m in g.members.values())
            or (not g.paged and all(m["scope"] == "global" for m in g.members.values()))
        ):
            return True
        # An incident still open takes an alert of its kind that nests with a live narrower
        # member, however long it has run: a user of a feature whose cost incident ran for
        # two hours paged twice as new incidents (probe N).
        return any(
            self._live(g, k) and m["kind"] == alert["kind"] and self._joins_through(g, alert, m)
            for k, m in g.members.items()
        )

    def _joins_through(self, g: Group, alert: dict[str, Any], member: dict[str, Any]) -> bool:
        """Whether ``alert`` nests with ``member``, a narrower member of ``g``. A feature's
        alert does not join through a *user* an incident paged for another feature: users
        call several features, and a feature's routing drift (and, on the Azure trace, a
        cost drift) was attached as related to another feature's cost incident through the
        cost alarms of users of both (probe T)."""
        if member["scope"] == "global" or not self._nests(alert["scope"], member["scope"]):
            return False
        if not self._calls_now(alert, member):
            return False
        if specificity(member["scope"]) == 2 and specificity(alert["scope"]) == 1 and g.paged:
            page = g.members[g.primary]["scope"]
            return specificity(page) != 1 or page == alert["scope"]
        return True

    def _calls_now(self, alert: dict[str, Any], member: dict[str, Any]) -> bool:
        """Whether two request-rate alerts of a user and a feature are about the same calls:
        the user calls the feature now. A user's alarm counts the calls it makes now; one
        who called chat 20 minutes before bursting on code joined chat's open surge, and
        code's page named the feature, not the user (probe 57, seeds 1 and 2)."""
        if (
            self.calls is None
            or alert["kind"] != "volume_spike"
            or member["kind"] != "volume_spike"
        ):
            return True
        scopes = {
            specificity(alert["scope"]): alert["scope"],
            specificity(member["scope"]): member["scope"],
        }
        return set(scopes) != {1, 2} or self.calls(scopes[2], scopes[1], alert["ts"])

    def _page(self, group: Group, now: datetime) -> list[dict[str, Any]]:
        if self.refresh is not None:  # held until now: the figures of now, not of the firing
            group.members = {k: self.refresh(m) for k, m in group.members.items()}
        group.paged = True
        group.page_members = frozenset(group.members)
        group.primary = self._choose(group, now)
        page = group.members[group.primary]
        group.page_life = _life(page)
        others = [k for k in group.members if k != group.primary]
        out = [self._mark(page, group, "primary", others)]
        out += [self._mark(group.members[k], group, "related") for k in others]
        out += [self._mark(update, group, "related") for update in group.pending or []]
        group.pending = None
        return out

    def _choose(self, group: Group, now: datetime) -> str:
        """The narrowest member that explains the wider ones (see the module docstring)."""
        members = sorted(group.members.values(), key=lambda a: (specificity(a["scope"]), -_size(a)))
        current = members[0]
        while True:
            narrower = [
                m
                for m in members
                if specificity(m["scope"]) > specificity(current["scope"])
                and self._nests(m["scope"], current["scope"])
                and self._explains(m, current, now)
            ]
            if not narrower:
                return str(current["alert_key"])
            current = max(narrower, key=_size)

    def _explains(self, narrow: dict[str, Any], wide: dict[str, Any], now: datetime) -> bool:
        """Whether ``narrow`` accounts for ``incident_explain_share`` of ``wide``. Two cost
        alerts compare their money (excess cost per call times calls): a scope's extra calls
        say nothing of a cost shift, and the heaviest user of a feature whose cost drifted
        was paged for it because their calls were most of the feature's (probe T)."""
        if narrow["kind"] == wide["kind"] == "cost_per_request":
            wide_size = _size(wide)
            if wide_size > 0 and _size(narrow) >= self.settings.incident_explain_share * wide_size:
                return True
            # Or it is far further from its normal than the wider scope: one user's 14x shift
            # in a feature it moved to 4x is the cause, whatever the feature's estimate of its
            # money (the held-out bench, seed 11); in a drift of the whole feature its users
            # are about as far from normal as it is.
            narrow_ratio, wide_ratio = _ratio(narrow), _ratio(wide)
            return (
                narrow_ratio is not None
                and wide_ratio is not None
                and wide_ratio > 0
                and narrow_ratio >= self.settings.incident_cost_ratio_explains * wide_ratio
            )
        return self.explains is not None and self.explains(narrow["scope"], wide["scope"], now)

    # -- resolved ---------------------------------------------------------------------------
    def _resolved(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        group = self.by_key.pop(alert["alert_key"], None)
        if group is None:
            return [alert]
        key = alert["alert_key"]
        if alert["details"].get("resolved_by") == "silence":
            self.closed_silent[key] = group.key
            self.silent_notified[key] = group.notified
            self.silent_heard[key] = group.heard_so_far()
        ts: datetime = alert["ts"]
        horizon = ts - timedelta(seconds=2 * self.settings.cooldown_seconds)
        for old in [k for k, (_, at) in self.closed_recent.items() if at < horizon]:
            del self.closed_recent[old]  # past its cooldown and another: cannot recur
        self.closed_recent[key] = (group.key, ts)
        group.resolved.add(key)
        peak = alert["details"].get("peak_impact_usd_per_hour")
        if peak is not None:
            group.peaks = {**(group.peaks or {}), key: float(peak)}
        out: list[dict[str, Any]] = []
        if not group.paged:
            out += self._page(group, alert["ts"])  # resolved within the hold: page it now
        everything = group.resolved >= set(group.members)
        holding = {k for k in group.members if not self._trails(group, k)}
        page_over = group.resolved >= holding
        if key == group.primary and not group.page_resolved and self._the_page(group, alert):
            if page_over:
                out.append(self._page_end(alert, group))
            else:
                group.held_resolve = alert
        else:
            out.append(self._mark(alert, group, "related"))
            if page_over and group.held_resolve is not None and not group.page_resolved:
                held = _incident_end(group, group.held_resolve, alert)
                out.append(self._page_end(held, group))
                group.held_resolve = None
        if everything:
            self.groups.remove(group)
        return out

    @staticmethod
    def _the_page(group: Group, alert: dict[str, Any]) -> bool:
        """Whether the resolve ``alert`` of the page's key ends the page's own lifecycle, not
        a later one of its key that joined the incident as a member (``_release_held``)."""
        return not group.page_life or _life(alert) == group.page_life

    def _trails(self, group: Group, key: str) -> bool:
        """Whether member ``key`` trails the page, and does not hold its resolve: narrower
        than the page's scope, joined after the page went out (not part of what it paged),
        and not critical (``critical_ratio``, ``critical_impact_usd_per_hour``)."""
        if group.page_members is None or key in group.page_members or key == group.primary:
            return False
        member, page = group.members[key], group.members[group.primary]
        return (
            specificity(member["scope"]) > specificity(page["scope"])
            and member.get("severity", "warning") != "critical"
        )

    def _page_end(self, alert: dict[str, Any], group: Group) -> dict[str, Any]:
        """The page's resolve, stating the incident's peak money as best known: the largest
        of its scope's members (the page's own figure and, e.g., a routing regression's cost
        alert that joined later)."""
        group.page_resolved = True
        page = group.members.get(group.primary, alert)
        peaks = group.peaks or {}
        figures = [
            (abs(money), k, money)
            for k, m in group.members.items()
            if m["scope"] == page["scope"]
            and (money := peaks.get(k, m.get("impact_usd_per_hour"))) is not None
        ]
        if not figures:
            return self._mark(alert, group, "primary")
        size, source, money = max(figures)
        details = {**alert["details"], "incident_peak_impact_usd_per_hour": f"{money:.4g}"}
        message = alert["message"]
        own = peaks.get(group.primary, page.get("impact_usd_per_hour"))
        if source != group.primary and (own is None or size > abs(own)):
            what = group.members[source]["kind"].replace("_", " ")
            message += (
                f"; the incident's extra spend at its peak as best known: "
                f"{money_per_hour(money)} (its {what})"
            )
            details["incident_peak_from"] = source
        return self._mark({**alert, "message": message, "details": details}, group, "primary")

    def _mark(
        self, alert: dict[str, Any], group: Group, role: str, others: list[str] | None = None
    ) -> dict[str, Any]:
        marked = {**alert, "incident_key": group.key, "incident_role": role}
        key, details = alert["alert_key"], alert.get("details", {})
        firsts = group.first_before = group.first_before or {}
        if role == "primary" and alert["status"] == "firing":
            group.paged_keys = group.paged_keys | {key}
            group.paged_lives = (group.paged_lives or frozenset()) | {_life(alert)}
        elif (
            role == "related"
            and alert["status"] != "firing"
            and key in group.paged_keys
            # a later lifecycle of a paged key was never paged: its resolve is a member's
            and (group.paged_lives is None or _life(alert) in group.paged_lives)
        ):
            # the resolve of an earlier page of the incident (an escalation took its place):
            # it goes where that page went (a pager's trigger was never resolved: a review)
            details = {**details, RESOLVES_PAGE: "true"}
            marked["details"] = details
        if alert["status"] == "firing":
            # How severe the incident's records were before this one: a target whose severity
            # filter let none of them through is paged by this one (the notifier's rule).
            # The same by kind, for a target that hears only some kinds.
            before, heard = group.notified, group.heard_so_far()
            heard_before = heard_text(heard)
            first_heard = group.first_heard = group.first_heard or {}
            raised_heard = group.raised_heard = group.raised_heard or {}
            first_severity = group.first_severity = group.first_severity or {}
            severity = str(alert.get("severity", DEFAULT_SEVERITY))
            if key not in firsts or SEVERITY_RAISED_FROM not in details:
                firsts[key], first_heard[key] = before, heard_before
                first_severity[key] = severity
                raised_heard.pop(key, None)  # a new lifecycle of the key: not risen (yet)
            elif key in first_severity:
                # its update: a target its firing did not reach hears of it here, or not
                heard_at_update = "" if role == "primary" else heard_before
                raised_heard[key] = (first_severity[key], heard_at_update)
            if severity_rank(severity) > severity_rank(before):
                group.notified = severity
            kind = str(alert.get("kind"))
            if severity_rank(severity) > severity_rank(heard.get(kind, NO_SEVERITY)):
                group.heard = {**heard, kind: severity}
            marked["details"] = {
                **details,
                INCIDENT_SEVERITY_BEFORE: before,
                INCIDENT_HEARD_BEFORE: heard_before,
            }
        elif role == "related" and key in firsts:
            # a member's resolve goes where its firing went
            marked["details"] = {**details, INCIDENT_SEVERITY_BEFORE: firsts[key]}
            if group.first_heard and key in group.first_heard:
                marked["details"][INCIDENT_HEARD_BEFORE] = group.first_heard[key]
        if alert["status"] != "firing" and group.raised_heard and key in group.raised_heard:
            # and where its update went, for a target its firing did not reach
            published, heard_at_update = group.raised_heard[key]
            marked["details"] = {
                **marked.get("details", details),
                SEVERITY_PUBLISHED: published,
                RAISED_HEARD_BEFORE: heard_at_update,
            }
        if others:
            listed = ", ".join(others[:8]) + (
                f" and {len(others) - 8} more" if len(others) > 8 else ""
            )
            marked["message"] = f"{alert['message']} (+{len(others)} related: {listed})"
            marked["details"] = {**marked.get("details", {}), "related": "; ".join(others)}
        return marked


def _incident_end(group: Group, held: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The page's resolve ``held`` for the rest of its incident, published as ``last`` (a
    member's resolve) ends it: at that time, saying when the incident ended, and what kept it
    open, after its own alarm's end (probe 57's D7: a burst's page resolved at 13:20:45 saying
    only "back to normal since 13:15:20 UTC ... in the 60 s before 13:18:20 UTC"). Its
    lifecycle (``first_seen``, ``last_seen``: the notifier's key) stays the page's."""
    ts = max(last["ts"], held["ts"])
    end, began = last.get("last_seen"), _first_seen(group)
    if ts <= held["ts"] or not isinstance(end, datetime) or end <= held.get("last_seen", end):
        return {**held, "ts": ts}
    since = (
        f", {duration_text(end - began)} after it began at {began:%H:%M:%S} UTC" if began else ""
    )
    message = (
        f"{held['message']}; the incident went on until {last['kind'].replace('_', ' ')} for "
        f"{last['scope']} was back to normal at {end:%H:%M:%S} UTC{since}"
    )
    details = {**held.get("details", {}), "incident_last_seen": end.isoformat()}
    return {**held, "ts": ts, "message": message, "details": details}


def _first_seen(group: Group) -> datetime | None:
    """When the incident's first member first fired (None: not known)."""
    firsts = [
        m["first_seen"] for m in group.members.values() if isinstance(m.get("first_seen"), datetime)
    ]
    return min(firsts, default=None)


def _page_over(group: Group) -> bool:
    """Whether on-call's last word on ``group`` is that it is over: its page's resolve went
    out, or it was reopened, unpaged, after its page closed for want of calls."""
    return group.page_resolved or group.reopened


def _size(alert: dict[str, Any]) -> float:
    """How much of an incident an alert accounts for: its money at stake, else its excess."""
    impact = alert.get("impact_usd_per_hour")
    if impact is not None:
        return abs(float(impact))
    observed, expected = alert.get("observed"), alert.get("expected")
    if observed is None or expected is None:
        return 0.0
    return abs(float(observed) - float(expected))


def _ratio(alert: dict[str, Any]) -> float | None:
    """How many times its expected value an alert observed (None: not both known)."""
    observed, expected = alert.get("observed"), alert.get("expected")
    if observed is None or expected is None or float(expected) <= 0:
        return None
    return float(observed) / float(expected)


def _life(alert: dict[str, Any]) -> str:
    """An alert's lifecycle: its key and when it first fired (its key alone when the record
    says not), as the notifier's ``lifecycle_key`` tells a pager's alerts apart."""
    first = alert.get("first_seen")
    if first is None:
        return str(alert["alert_key"])
    return f"{alert['alert_key']}@{first.isoformat() if isinstance(first, datetime) else first}"


def _incident_key(alert: dict[str, Any]) -> str:
    return f"{alert['alert_key']}@{alert['ts']:%Y-%m-%dT%H:%M:%S}"


__all__ = ["Correlator", "Group", "specificity"]
