"""A dispatcher's own budget change is never undone by the echo of an older one.

Seen as a "flaky" integration test (`test_an_answer_cut_by_the_budget_is_not_cached`): an
admin set user:tom's cap to $0.001, then to $100, and the next call got a 402. The PUT of
$100 applied at once, then the policies topic delivered the *first* PUT's record ($0.001),
which overwrote it until the second record arrived. A user under the cap was refused.

The rule: once a dispatcher has written a scope's policy, records of that scope that come
before its own in the topic are older than its write and are skipped; from its own record
on, the topic's order rules again (so a later change by another dispatcher still applies).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from app.budgets.admin import deletion_record, policy_record
from app.budgets.policy import Policy, PolicyBook, parse_policy


def _policy(limit: float, scope: str = "user:tom") -> Policy:
    return parse_policy(scope, {"limit_usd": limit})


def _limit(book: PolicyBook, scope: str = "user:tom") -> Any:
    policy = book.policies.get(scope)
    return None if policy is None else policy.limit_usd


def test_the_echo_of_an_older_write_does_not_undo_a_newer_one() -> None:
    book = PolicyBook()
    first = policy_record(_policy(0.001))
    book.put_local(_policy(0.001), first["event_id"])
    second = policy_record(_policy(100))
    book.put_local(_policy(100), second["event_id"])
    book.apply_record(first, "user:tom")  # the topic delivers the first PUT now
    assert str(_limit(book)) == "100"
    book.apply_record(second, "user:tom")  # its own: the topic has caught up
    assert str(_limit(book)) == "100"
    later = policy_record(_policy(7))  # another dispatcher's change, after ours
    book.apply_record(later, "user:tom")
    assert str(_limit(book)) == "7"


def test_a_deletion_is_not_undone_by_the_echo_of_the_policy_it_deleted() -> None:
    book = PolicyBook()
    created = policy_record(_policy(5))
    book.put_local(_policy(5), created["event_id"])
    deleted = deletion_record("user:tom")
    book.remove_local("user:tom", deleted["event_id"])
    book.apply_record(created, "user:tom")
    assert _limit(book) is None
    book.apply_record(deleted, "user:tom")
    book.apply_record(policy_record(_policy(9)), "user:tom")
    assert str(_limit(book)) == "9"


def test_other_scopes_follow_the_topic_as_before() -> None:
    book = PolicyBook()
    book.put_local(_policy(1), policy_record(_policy(1))["event_id"])
    book.apply_record(policy_record(_policy(3, "user:ann")), "user:ann")
    assert str(_limit(book, "user:ann")) == "3"


# A model of one scope: local writes (this dispatcher) and foreign writes (others) go into
# one topic in the order they were written; the topic delivers them in that order, at any
# moment. Whatever the interleaving, the book shows this dispatcher's latest write until
# the topic reaches it, then what the topic says.
@given(st.lists(st.sampled_from(["local", "foreign", "deliver"]), max_size=40))
def test_any_interleaving_reads_its_own_writes_and_ends_where_the_topic_ends(
    steps: list[str],
) -> None:
    book = PolicyBook()
    topic: list[tuple[dict[str, Any], bool]] = []  # (record, written here)
    delivered = 0
    expected: float | None = None  # what the book must show
    pending_local: str | None = None  # our latest write not yet delivered
    for n, step in enumerate(steps, start=1):
        if step == "local":
            record = policy_record(_policy(n))
            book.put_local(_policy(n), record["event_id"])
            topic.append((record, True))
            expected, pending_local = n, record["event_id"]
        elif step == "foreign":
            topic.append((policy_record(_policy(n)), False))
        elif delivered < len(topic):
            record, _mine = topic[delivered]
            delivered += 1
            book.apply_record(record, "user:tom")
            if pending_local is None:
                expected = _record_limit(record)
            elif record["event_id"] == pending_local:
                pending_local = None
        shown = _limit(book)
        assert (None if shown is None else float(shown)) == expected, steps[:n]
    for record, _mine in topic[delivered:]:  # the topic catches up: it has the last word
        book.apply_record(record, "user:tom")
    if topic:
        assert float(_limit(book)) == _record_limit(topic[-1][0])


def _record_limit(record: dict[str, Any]) -> float:
    return record["limit_usd_nanos"] / 1e9
