"""The savings levers' pure logic: the stream assembler behind caching streamed answers, and
the dispatcher's bounded memory of routed calls that outcomes teach the router from."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from app.cache.assemble import CompletionAssembler
from app.cache.config import CacheSettings
from app.cache.replay import sse_replay
from app.gateway.savings import SavingsLevers
from app.routing.config import RoutingSettings

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_x",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris,  the\tcapital — é.",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
}


def chunks_of(stream: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in stream.split(b"\n\n") if line.startswith(b"data: {")]


def test_a_streamed_answer_is_rebuilt_exactly() -> None:
    assembler = CompletionAssembler()
    for chunk in chunks_of(sse_replay(ANSWER, include_usage=True)):
        assembler.feed(chunk)
    assert assembler.completion() == ANSWER


def test_tool_calls_and_unfinished_streams_are_not_rebuilt() -> None:
    with_tools = {
        **ANSWER,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }  # fmt: skip
    assembler = CompletionAssembler()
    for chunk in chunks_of(sse_replay(with_tools, include_usage=True)):
        assembler.feed(chunk)
    assert assembler.completion() is None
    unfinished = CompletionAssembler()
    for chunk in chunks_of(sse_replay(ANSWER, include_usage=True))[:-2]:
        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
            break
        unfinished.feed(chunk)
    assert unfinished.completion() is None


def body(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


def test_outcomes_teach_once_and_memory_is_bounded() -> None:
    levers = SavingsLevers(RoutingSettings(remember_routed=2), CacheSettings())
    prompt = body("What is the capital of France?")
    route = levers.route("r1", prompt, None)
    assert route.routed and route.tier == "economy"
    before = levers.router.score(prompt)[0]
    assert levers.learn_outcome("r1", "failure")
    assert not levers.learn_outcome("r1", "failure"), "a routed call teaches once"
    assert levers.router.score(prompt)[0] > before
    for request_id in ("r2", "r3", "r4"):
        levers.route(request_id, prompt, None)
    assert not levers.learn_outcome("r2", "success"), "the oldest is forgotten beyond the bound"
    assert levers.learn_outcome("r4", "success")
    assert not levers.learn_outcome("unknown", "success")


def test_a_concrete_model_is_not_routed_nor_remembered() -> None:
    levers = SavingsLevers(RoutingSettings(), CacheSettings())
    route = levers.route("r1", {**body("hi"), "model": "gpt-4o-mini"}, None)
    assert not route.routed and route.model == "gpt-4o-mini" and route.tier == "economy"
    assert route.score is None
    assert not levers.learn_outcome("r1", "failure")


def test_shared_learning_publishes_features_and_never_learns_locally() -> None:
    """With routing.shared_learning the dispatcher publishes what the learner needs (features of
    economy-routed calls, failures it judged) and its own router never changes."""
    from app.routing.escalation import Failure
    from app.routing.shared import LabelRecord, RoutedCall, decode_record

    published: list[tuple[str, bytes]] = []
    levers = SavingsLevers(
        RoutingSettings(shared_learning=True),
        CacheSettings(),
        publish=lambda key, value: published.append((key, value)),
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hi there?"}]}
    before = levers.router.published_snapshot()
    route = levers.route("req_1", body, None)
    assert route.tier == "economy"
    assert [key for key, _ in published] == ["req_1"]
    routed = decode_record(published[0][1])
    assert isinstance(routed, RoutedCall) and routed.request_id == "req_1"
    assert levers.learn_outcome("req_1", "failure") is False
    levers.escalate(route, Failure.EMPTY, request_id="req_1", feature=None, attempt=1)
    assert decode_record(published[1][1]) == LabelRecord("req_1", "failure", "validator:empty")
    levers.escalate(route, Failure.UPSTREAM_ERROR, request_id="req_1", feature=None, attempt=1)
    assert len(published) == 2  # an upstream error says nothing about the prompt
    assert levers.router.published_snapshot() == before


def test_shared_learning_needs_a_publisher() -> None:
    import pytest

    with pytest.raises(ValueError, match="publisher"):
        SavingsLevers(RoutingSettings(shared_learning=True), CacheSettings())


# -- the failure model loads on the first scored request ---------------------------------------
AUTO = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


async def test_concurrent_first_routed_requests_share_one_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.routing.router import Router

    levers = SavingsLevers(RoutingSettings(), CacheSettings())
    assert not levers.model_needed({**AUTO, "model": "gpt-4o"}, None)  # a named model
    assert levers.model_needed(AUTO, None)
    loads = []
    original = Router.load_model

    def counting(router: Router) -> Any:
        loads.append(router.model_loaded)
        return original(router)

    monkeypatch.setattr(Router, "load_model", counting)
    await asyncio.gather(*(levers.load_model() for _ in range(5)))
    assert loads == [False], "five waiting requests, one load"
    assert not levers.model_needed(AUTO, None)
    assert levers.route("r1", AUTO, None).tier == "economy"


async def test_a_deferred_shared_model_that_cannot_be_restored_keeps_the_current_one() -> None:
    from app.routing.router import Router

    levers = SavingsLevers(RoutingSettings(), CacheSettings())
    levers.defer_router(lambda: Router.restore(RoutingSettings(), b"not a checkpoint"))
    assert levers.model_needed(AUTO, None)
    await levers.load_model()
    assert levers.router_version == 0 and levers.router.model_loaded
    assert levers.route("r1", AUTO, None).routed

    learned = Router(RoutingSettings())
    for _ in range(3):
        learned.learn(AUTO, "economy", "failure")
    snapshot = learned.snapshot()
    levers.defer_router(lambda: Router.restore(RoutingSettings(), snapshot))
    assert levers.model_needed(AUTO, None), "a newer shared model waits to be restored"
    await levers.load_model()
    assert levers.router_version == 1
    assert levers.router.model.outcomes_learned == 3


@pytest.mark.parametrize("case", ["routed down by its budget", "pinned to economy", "learn off"])
def test_no_label_is_published_for_a_call_whose_features_were_not(case: str) -> None:
    """Shared learning: a failure judged on an economy answer is a label only for a call whose
    features were published (closing39 L3). An economy call routed down by its budget, pinned
    to economy, or of a feature that does not learn published none: a label would wait at the
    learner for a call that never comes, pushing out labels that have one."""
    from app.routing.config import FeatureRule, Tier
    from app.routing.escalation import Failure

    published: list[tuple[str, bytes]] = []
    rules = {
        "standard": FeatureRule(quality_target=0.999999, premium_above=1.0),
        "pinned": FeatureRule(pin=Tier.ECONOMY),
        "unlearned": FeatureRule(learn=False),
    }
    levers = SavingsLevers(
        RoutingSettings(shared_learning=True, exploration_rate=0.0, features=rules),
        CacheSettings(),
        publish=lambda key, value: published.append((key, value)),
    )
    prompt = body("Hi there?")
    feature = {"routed down by its budget": "standard", "pinned to economy": "pinned"}.get(
        case, "unlearned"
    )
    route = levers.route("req_1", prompt, feature)
    if case == "routed down by its budget":
        assert route.tier == "standard"
        down = levers.budget_fallback(route, feature, "user:u: over")
        assert down is not None
        route = down
    assert route.routed and route.tier == "economy"
    assert published == []  # no features record for this call
    levers.escalate(route, Failure.EMPTY, request_id="req_1", feature=feature, attempt=1)
    assert published == []


@pytest.mark.parametrize("case", ["explored", "route_all names a model", "economy by its score"])
def test_a_judged_failure_of_a_call_whose_features_were_published_is_still_a_label(
    case: str,
) -> None:
    """The other side of the test above (a review of closing39 L3): every economy call whose
    features went to the learner still gets its validator label, including one sent to
    economy by exploration and one a ``route_all`` feature routed from the model it named."""
    from app.routing.config import FeatureRule
    from app.routing.escalation import Failure
    from app.routing.shared import LabelRecord, RoutedCall, decode_record

    published: list[tuple[str, bytes]] = []
    rules = {
        "hard": FeatureRule(quality_target=0.999999, premium_above=1.0),  # scored standard
        "all": FeatureRule(route_all=True, quality_target=0.000001),  # scored economy
    }
    levers = SavingsLevers(
        RoutingSettings(shared_learning=True, exploration_rate=0.5, features=rules),
        CacheSettings(),
        publish=lambda key, value: published.append((key, value)),
    )
    prompt = body("Hi there?")
    feature: str | None = None
    request_id = "req_1"
    if case == "explored":
        feature = "hard"
        request_id = next(r for r in (f"req_{i}" for i in range(100)) if levers.router.explores(r))
    elif case == "route_all names a model":
        feature, prompt = "all", {**prompt, "model": "gpt-4o"}
    else:
        request_id = next(
            r for r in (f"req_{i}" for i in range(100)) if not levers.router.explores(r)
        )
    route = levers.route(request_id, prompt, feature)
    assert route.routed and route.tier == "economy" and route.learns
    assert route.explored == (case == "explored")
    (routed,) = [decode_record(value) for _, value in published]
    assert isinstance(routed, RoutedCall) and routed.request_id == request_id
    step = levers.escalate(
        route, Failure.REFUSED, request_id=request_id, feature=feature, attempt=1
    )
    assert step is not None and step[1].tier == "standard"
    assert decode_record(published[-1][1]) == LabelRecord(
        request_id, "failure", "validator:refused"
    )
