"""Shared learning's pure part: the routing.features records and the outcome join.

A routed record must carry exactly what the router learns from (learning from the decoded
record gives the same model as learning from the body), labels and calls meet in either
order, each call teaches at most once (a re-sent record, a second outcome), and the waiting
room is bounded.
"""

from __future__ import annotations

import pickle

import pytest

from app.routing.config import RoutingSettings
from app.routing.router import Router
from app.routing.shared import (
    LabelRecord,
    OutcomeJoin,
    RoutedCall,
    SharedRecordError,
    decode_record,
    encode_label,
    encode_routed,
)

BODY = {"model": "auto", "messages": [{"role": "user", "content": "Derive x^2 step by step."}]}


def test_routed_record_round_trip_learns_like_the_body() -> None:
    settings = RoutingSettings()
    direct, shared = Router(settings), Router(settings)
    features = direct.features(BODY)
    record = decode_record(encode_routed("req_1", "chat", features))
    assert isinstance(record, RoutedCall)
    assert record.request_id == "req_1" and record.feature == "chat"
    assert b"Derive" not in encode_routed("req_1", "chat", features)  # no prompt text
    for _ in range(5):
        direct.learn(BODY, "economy", "failure", "chat")
        shared.learn_features(record.features, "economy", "failure", "chat")
    assert direct.score(BODY, "chat") == shared.score(BODY, "chat")
    assert direct.snapshot() == shared.snapshot()


def test_label_record_and_bad_records() -> None:
    label = decode_record(encode_label("req_2", "failure", "validator:empty"))
    assert label == LabelRecord("req_2", "failure", "validator:empty")
    for bad in (b"not json", b'{"v": 99, "kind": "routed"}', b'{"v": 1, "kind": "other"}'):
        with pytest.raises(SharedRecordError):
            decode_record(bad)


def call(request_id: str) -> RoutedCall:
    features = Router(RoutingSettings()).features(BODY)
    return RoutedCall(request_id, None, features)


def test_join_in_either_order_and_once() -> None:
    join = OutcomeJoin(max_waiting=10)
    assert join.add_call(call("a")) is None
    example = join.add_label("a", "failure")
    assert example is not None and example.outcome == "failure"
    assert join.add_label("b", "success") is None  # outcome before the routed record
    example = join.add_call(call("b"))
    assert example is not None and example.outcome == "success"
    # a second outcome, a re-sent routed record: nothing more to learn
    assert join.add_label("a", "success") is None
    assert join.add_call(call("a")) is None
    assert join.add_call(call("b")) is None
    assert join.add_label("b", "failure") is None
    # labels that are not success/failure, or name no request, are not examples
    assert join.add_label(None, "failure") is None
    join.add_call(call("c"))
    assert join.add_label("c", "partial") is None
    assert join.add_label("c", "success") is not None


def test_first_label_wins_while_waiting() -> None:
    join = OutcomeJoin(max_waiting=10)
    join.add_label("a", "failure")
    join.add_label("a", "success")
    example = join.add_call(call("a"))
    assert example is not None and example.outcome == "failure"


def test_bounded_and_picklable() -> None:
    join = OutcomeJoin(max_waiting=3)
    for i in range(5):
        join.add_call(call(f"r{i}"))
        join.add_label(f"l{i}", "success")
    assert list(join.waiting_calls) == ["r2", "r3", "r4"]
    assert list(join.waiting_labels) == ["l2", "l3", "l4"]
    assert join.forgotten_calls == 2 and join.forgotten_labels == 2
    assert join.add_label("r0", "failure") is None  # forgotten: not learned
    restored = pickle.loads(pickle.dumps(join))
    example = restored.add_label("r4", "failure")
    assert example is not None and example.request_id == "r4"


def test_a_routed_record_from_a_dispatcher_with_fewer_signals_is_learned() -> None:
    """During an upgrade, an older dispatcher's records lack newer signals (``context``):
    they count as 0, not as an unreadable record or a crash of the learner."""
    import orjson

    router = Router(RoutingSettings())
    features = router.features({"messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    record = orjson.loads(encode_routed("req_old", None, features))
    del record["signals"]["context"]
    decoded = decode_record(orjson.dumps(record))
    assert isinstance(decoded, RoutedCall)
    assert decoded.features.signals["context"] == 0.0
    assert router.learn_features(decoded.features, "economy", "failure")
