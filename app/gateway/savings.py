"""The savings levers as the dispatcher pulls them: routing, escalation, the response cache,
and learning from the outcomes of routed calls.

Owns the glue between one chat request and the domain packages: asking the
:class:`~app.routing.router.Router` for a tier (only for ``model: "auto"`` and features whose
rule says ``route_all``: a request naming a model keeps it), retargeting the request at the
routed model, deciding whether a failed attempt escalates, planning / reading / writing the
response cache, and remembering the features of economy-routed calls so an outcome posted
later to this dispatcher (``/v1/outcomes``) teaches the router. It does not own the attempts of a
request (``app.gateway.chat``), HTTP (``app.http.chat``), upstream calls or events
(``app.gateway.pipeline``), scoring (``app.routing``) or storage (``app.cache``).

Learning, two modes (``routing.shared_learning``):

- **local** (default): the dispatcher that routed a call learns from the outcomes posted to it
  for that call (and from the validator failures it judged);
- **shared**: the dispatcher learns nothing itself. It publishes the features of each
  economy-routed call, and a label when it judged the economy answer a failure, through
  ``publish`` (``<prefix>.routing.features``, see :mod:`app.routing.shared`); the one learner
  (``tollgate router-learn``) joins them with the outcomes topic and publishes the model,
  which :mod:`app.gateway.shared_router` installs here with :meth:`SavingsLevers.use_router`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import orjson

from app.cache.assemble import CompletionAssembler
from app.cache.config import CacheSettings
from app.cache.key import CacheLookup, parse_cache_control, plan_lookup
from app.cache.store import CacheBackend, CachedAnswer, MemoryCache
from app.metering.attribution import Identity
from app.routing.config import TIER_ORDER, RoutingSettings, Tier
from app.routing.escalation import Escalation, EscalationPolicy, Failure
from app.routing.router import Router
from app.routing.shared import encode_label, encode_routed

if TYPE_CHECKING:  # the model (numpy, River) loads on the first routed request: load_model
    from app.routing.scoring import Features

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "bypass"]


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What the events and headers of one attempt say about routing."""

    model_requested: str  # what the client asked for: "auto", or its own model
    model: str  # the model to call
    tier: str | None  # the served model's tier
    routed: bool = False
    score: float | None = None
    reason: str | None = None
    provider: str | None = None
    # The model whose list price is the call's "requested cost" (the routing saving is the
    # difference): for a routed "auto" call, the provider's top tier — what a caller without a
    # router would pick to be safe. None: the requested model itself (a named model, routed
    # by a route_all feature or not).
    reference_model: str | None = None
    escalated: bool = False  # this attempt is the retry one tier up
    explored: bool = False  # sent to economy despite its score, to learn (exploration_rate)
    # Routed down by the budget (an "auto" call whose routed tier the budget gate refused):
    # the model the router chose, and the cheapest tier refused. Such a call never escalates:
    # it is served on the first tier below the refused one that has a model, so the next tier
    # up, where an escalation goes, is the refused one.
    budget_downgraded_from: str | None = None
    budget_refused_tier: str | None = None
    # Its features were published (shared learning) or remembered to learn from: only then is
    # a failure judged on its answer a label. A label of any other call (routed down by its
    # budget, pinned, or of a feature that does not learn) would wait at the learner for a
    # features record that never comes.
    learns: bool = False


@dataclass(frozen=True, slots=True)
class _Remembered:
    features: Features
    feature: str | None


class SavingsLevers:
    """One per dispatcher: the router, the escalation policy and the response cache."""

    def __init__(
        self,
        routing: RoutingSettings,
        cache: CacheSettings,
        *,
        tier_of_price: Any = None,
        router: Router | None = None,
        backend: CacheBackend | None = None,
        publish: Callable[[str, bytes], object] | None = None,
    ) -> None:
        """``publish(request_id, value)``: queue a routing.features record (shared learning;
        required when ``routing.shared_learning`` is on)."""
        self.routing = routing
        self.cache_settings = cache
        self.router = router or Router(routing, scoring_only=routing.shared_learning)
        self.escalation = EscalationPolicy(routing)
        self.cache: CacheBackend | None = backend or (
            MemoryCache(cache.max_bytes, max_entry_bytes=cache.max_entry_bytes)
            if cache.enabled
            else None
        )
        self._tier_of_price = tier_of_price or (lambda model: None)
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        if routing.shared_learning and publish is None:
            raise ValueError("routing.shared_learning needs a publisher for routing.features")
        self._publish = publish if routing.shared_learning else None
        self.router_version = 0  # shared models installed by use_router
        self._pending: Callable[[], Router] | None = None  # a shared model not yet restored
        self._loading: asyncio.Future[None] | None = None

    def use_router(self, router: Router) -> None:
        """Score with ``router`` from now on (the shared learner's latest model)."""
        self.router = router
        self.router_version += 1

    # -- loading the failure model -------------------------------------------------------------
    # A dispatcher that learns on its own needs numpy and River (and River scipy): about 90 MB of
    # memory and a second or more of imports; one that shares a learner needs only numpy and
    # the scoring model (app.routing.scoring, about 15 MB, under 0.1 s). Either is loaded for
    # the first request that is scored, in a thread so that the event loop keeps answering
    # other requests meanwhile.
    @property
    def model_loaded(self) -> bool:
        return self._pending is None and self.router.model_loaded

    def defer_router(self, restore: Callable[[], Router]) -> None:
        """Install a shared model when the first scored request needs it (``restore`` builds its
        router; it runs in :meth:`load_model`'s thread)."""
        self._pending = restore

    def model_needed(self, body: Mapping[str, Any], feature: str | None) -> bool:
        """Whether :meth:`route` of ``body`` would load the failure model (await
        :meth:`load_model` first)."""
        return not self.model_loaded and self.router.needs_model(body, feature)

    async def load_model(self) -> None:
        """Load the failure model (and a deferred shared model) in a thread; callers that arrive
        while it loads wait for the same load."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load_model))
        await asyncio.shield(self._loading)

    def _load_model(self) -> None:
        started = time.monotonic()
        loaded_before = self.router.model_loaded
        restore, self._pending = self._pending, None
        if restore is not None:
            try:
                router = restore()
            except Exception:  # the learner's snapshot: keep scoring with the model we have
                log.exception("shared router model not installed; keeping the current model")
            else:
                router.load_model()
                self.use_router(router)
                log.info(
                    "shared router model installed",
                    extra={"outcomes_learned": router.model.outcomes_learned},
                )
        self.router.load_model()
        if not loaded_before:
            log.info(
                "router model loaded for the first scored request",
                extra={"elapsed_s": round(time.monotonic() - started, 3)},
            )

    # -- routing ----------------------------------------------------------------------------
    def tier_of(self, model: str) -> str | None:
        tier = self.router.tier_of(model)
        return tier.value if tier is not None else self._tier_of_price(model)

    def route(
        self,
        request_id: str,
        body: Mapping[str, Any],
        feature: str | None,
        *,
        may_explore: Callable[[], bool] = lambda: True,
    ) -> RouteInfo:
        """The routing of a request (raises ``PromptError`` for a body the router cannot read).

        A request that is not routed keeps its model (``RouteInfo.routed`` is False).
        ``may_explore()``: whether this call may be sent to economy to learn (asked only when
        exploration could apply: the dispatcher says no near a budget limit)."""
        requested = body.get("model")
        if not self.router.wants_routing(body, feature):
            model = requested if isinstance(requested, str) else ""
            return RouteInfo(model_requested=model, model=model, tier=self.tier_of(model))
        rule = self.routing.rule_for(feature)
        features = None if rule.pin is not None else self.router.features(body)
        explore = (
            features is not None
            and self.routing.exploration_rate > 0
            and self.router.may_explore(feature)
            and self.router.explores(request_id)
            and may_explore()
        )
        decision = self.router.route(
            body, feature, features, explore_key=request_id if explore else None
        )
        provider = self.routing.provider_tiers(decision.provider)
        top = next(m for t in reversed(TIER_ORDER) if (m := provider.model_for(t)))
        # What was asked for: a model the client named (route_all routes those too) is its own
        # price reference; only "auto" (or no model) names none and is priced at the top tier.
        names_a_model = (
            isinstance(requested, str) and bool(requested) and requested != self.routing.auto_model
        )
        learns = False  # its features kept to learn from (RouteInfo.learns)
        if (
            features is not None
            and decision.tier is Tier.ECONOMY
            and self.router.learns(Tier.ECONOMY, feature)
        ):
            learns = True
            if self._publish is not None:
                self._publish(request_id, encode_routed(request_id, feature, features))
            else:
                self._remember(request_id, _Remembered(features, feature))
        return RouteInfo(
            model_requested=requested if isinstance(requested, str) else decision.model,
            model=decision.model,
            tier=decision.tier.value if decision.tier else None,
            routed=True,
            score=decision.score,
            reason=decision.reason,
            provider=decision.provider,
            reference_model=None if names_a_model else top,
            explored=decision.explored,
            learns=learns,
        )

    def budget_fallback(self, route: RouteInfo, feature: str | None, why: str) -> RouteInfo | None:
        """The next cheaper tier for an ``auto`` call whose routed tier the budget gate refused
        (``why``), or None: a named model (routed by ``route_all`` or not) is never changed, nor
        a pinned feature's tier, and no call goes below its feature's ``min_tier``."""
        if not route.routed or route.tier is None or route.reference_model is None:
            return None
        rule = self.routing.rule_for(feature)
        if rule.pin is not None:
            return None
        tiers = self.routing.provider_tiers(route.provider)
        refused = Tier(route.tier)
        for tier in reversed(TIER_ORDER[: refused.rank]):
            if rule.min_tier is not None and tier.rank < rule.min_tier.rank:
                return None
            model = tiers.model_for(tier)
            if model:
                return replace(
                    route, model=model, tier=tier.value, explored=False,
                    reason=f"{route.reason}; budget: {route.model} refused ({why}), "
                    f"routed down to {tier.value}",
                    budget_downgraded_from=route.budget_downgraded_from or route.model,
                    budget_refused_tier=refused.value,
                )  # fmt: skip
        return None

    def escalate(
        self,
        route: RouteInfo,
        failure: Failure | None,
        *,
        request_id: str,
        feature: str | None,
        attempt: int,
    ) -> tuple[Escalation, RouteInfo] | None:
        """The next attempt after ``failure`` of a routed call, or None (answer as it is).

        A validator failure (empty, truncated or refused output) of an economy answer is a
        labelled failure for the router (of a call whose features it kept,
        ``RouteInfo.learns``); an upstream error or timeout is not (it says
        nothing about whether economy could answer the prompt). A call routed down by its
        budget (``budget_refused_tier``) never escalates (see :class:`RouteInfo`)."""
        if failure is None or not route.routed or route.tier is None:
            return None
        step = self.escalation.escalation(
            failure, tier=Tier(route.tier), feature=feature, attempt=attempt,
            provider=route.provider,
        )  # fmt: skip
        judged = failure in (Failure.EMPTY, Failure.TRUNCATED, Failure.REFUSED)
        if self._publish is not None:
            if judged and route.learns and route.tier == Tier.ECONOMY.value and attempt == 1:
                label = encode_label(request_id, "failure", f"validator:{failure.value}")
                self._publish(request_id, label)
        else:
            remembered = self._remembered.pop(request_id, None)
            if judged and remembered:
                self.router.learn_features(remembered.features, Tier.ECONOMY, "failure", feature)
        if step is None or route.budget_refused_tier is not None:
            return None
        # the escalated attempt is the tier the router would have chosen: not exploration
        escalated = replace(
            route, model=step.model, tier=step.tier.value, escalated=True, explored=False
        )
        return step, escalated

    def may_escalate(self, route: RouteInfo, feature: str | None, attempt: int) -> bool:
        """Whether a failure of this attempt could still escalate (see ``escalate``)."""
        if not route.routed or route.tier is None or route.budget_refused_tier is not None:
            return False
        return self.escalation.possible(
            tier=Tier(route.tier), feature=feature, attempt=attempt, provider=route.provider
        )

    def would_escalate(
        self,
        route: RouteInfo,
        stored: bytes,
        feature: str | None,
        attempt: int,
        output_limited: bool,
    ) -> bool:
        """Whether a stored answer (``chat.completion`` JSON) would escalate this attempt had
        the provider just given it: an empty, refused or (not at the client's own
        ``max_tokens``) truncated answer, stored by a call that named the model (a probe: it
        was replayed to ``auto``, where a live one escalates)."""
        if not route.routed or route.tier is None or route.budget_refused_tier is not None:
            return False
        try:
            completion = orjson.loads(stored)
        except orjson.JSONDecodeError:
            return False
        failure = self.validate(route, completion)
        if failure is None or (failure is Failure.TRUNCATED and output_limited):
            return False
        step = self.escalation.escalation(
            failure, tier=Tier(route.tier), feature=feature, attempt=attempt,
            provider=route.provider,
        )  # fmt: skip
        return step is not None

    def validate(self, route: RouteInfo, completion: Any) -> Failure | None:
        """The configured validators on a routed call's answer (None: acceptable)."""
        if not route.routed or not isinstance(completion, Mapping):
            return None
        return self.escalation.validate(completion)

    # -- learning from outcomes ---------------------------------------------------------------
    def _remember(self, request_id: str, entry: _Remembered) -> None:
        if self.routing.remember_routed <= 0:
            return
        self._remembered[request_id] = entry
        while len(self._remembered) > self.routing.remember_routed:
            self._remembered.popitem(last=False)

    def learn_outcome(self, request_id: str | None, outcome: str) -> bool:
        """Learn a reported outcome of an economy call this dispatcher routed; True if learned.

        Each routed call teaches once (its first outcome); calls routed by another
        dispatcher, or forgotten (``routing.remember_routed``), are not learned here. With
        shared learning nothing is learned here: the learner reads the Outcome event."""
        remembered = self._remembered.pop(request_id or "", None)
        if remembered is None or outcome not in ("success", "failure"):
            return False
        return self.router.learn_features(
            remembered.features,
            Tier.ECONOMY,
            "success" if outcome == "success" else "failure",
            remembered.feature,
        )

    # -- the response cache --------------------------------------------------------------------
    def cache_plan(
        self,
        body: Mapping[str, Any],
        identity: Identity,
        cache_control: str | None,
        headers: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]] = (),
    ) -> CacheLookup:
        """``headers``: the client headers sent on to the provider, or a function that works
        them out, called only when the plan has a key (see ``plan_lookup``)."""
        if self.cache is None:
            return CacheLookup("bypass", "cache disabled (TOLLGATE_CACHE enabled=false)")
        return plan_lookup(
            self.cache_settings,
            body,
            feature=identity.feature,
            team=identity.team,
            api_key_id=identity.api_key_id,
            user_id=identity.user_id,
            cache_control=parse_cache_control(cache_control),
            headers=headers,
        )

    async def lookup(self, plan: CacheLookup) -> CachedAnswer | None:
        if self.cache is None or plan.status != "lookup" or plan.key is None:
            return None
        return await self.cache.get(plan.key, max_age_s=plan.max_age_s)

    async def store(
        self, plan: CacheLookup, body: bytes, model: str, prompt_tokens: int, completion_tokens: int
    ) -> bool:
        """Store a fresh answer when the plan allows it (never an error or a partial answer)."""
        if self.cache is None or not plan.store or plan.key is None:
            return False
        answer = CachedAnswer(body, model, prompt_tokens, completion_tokens)
        return await self.cache.put(plan.key, answer, ttl_s=plan.ttl_s)

    def assembler(self, plan: CacheLookup) -> CompletionAssembler | None:
        """A stream's assembler when its answer may be stored, else None (nothing to do)."""
        return CompletionAssembler() if self.cache is not None and plan.store else None
