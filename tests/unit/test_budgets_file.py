from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.budgets.admin import (
    apply_budgets_file,
    budgets_file_action,
    deletion_record,
    file_policy_record,
    load_budgets_file,
    policy_record,
    with_file_digest,
)
from app.budgets.policy import Policy, PolicyBook, PolicyError, file_digest_of, parse_policy


def test_budgets_file_gives_validated_policies(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(
        'budgets:\n  "user:*": {period: month, limit_usd: 5, upgrade_url: "https://x.test/up"}\n'
        "  global: {period: day, limit_usd: 1000, timezone: Europe/Paris}\n"
    )
    policies = {p.scope: p for p in load_budgets_file(path)}
    assert policies["user:*"].limit_usd_nanos == 5_000_000_000
    assert policies["global"].timezone == "Europe/Paris"


def test_a_bad_entry_names_file_scope_and_field(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  user:bob: {period: month, limit_usd: -1}\n")
    with pytest.raises(PolicyError, match=r"budgets.user:bob.*limit_usd") as info:
        load_budgets_file(path)
    assert info.value.field == "limit_usd"


def test_a_zone_folder_in_the_file_is_a_policy_error_not_a_crash(tmp_path: Path) -> None:
    """`timezone: America` raised IsADirectoryError out of the loader (the dispatcher reads
    the file at start-up): it names the file, the scope and the field now."""
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  global: {period: day, limit_usd: 10, timezone: America}\n")
    with pytest.raises(PolicyError, match=r"budgets.global.*timezone") as info:
        load_budgets_file(path)
    assert info.value.field == "timezone"


# -- which entries a dispatcher start publishes (probe 54, F1) ----------------------------
def _entry(limit_usd: int, prompt: str | None = None) -> Policy:
    return parse_policy(
        "user:x", {"period": "day", "limit_usd": limit_usd, "upgrade_prompt": prompt}
    )


def test_an_entry_the_file_never_published_is_published() -> None:
    assert budgets_file_action(_entry(5), None) == "publish"
    # set through the API before the file named it (no file entry on record: "")
    api = policy_record(_entry(3), "admin-key", "")
    assert budgets_file_action(_entry(5), api) == "publish"


def test_an_api_change_after_the_files_publication_is_kept_until_the_file_changes() -> None:
    published = file_policy_record(_entry(5))
    assert budgets_file_action(_entry(5), published) == "unchanged"
    stopped = policy_record(_entry(1), "admin-key", file_digest_of(published))
    assert budgets_file_action(_entry(5), stopped) == "kept"
    removed = deletion_record("user:x", "admin-key", file_digest_of(stopped))
    assert budgets_file_action(_entry(5), removed) == "kept"
    assert budgets_file_action(_entry(6), removed) == "publish"  # the file's entry edited
    assert budgets_file_action(_entry(5, "new text"), stopped) == "publish"


def test_a_file_record_written_before_records_carried_the_digest_is_recognised() -> None:
    old = file_policy_record(_entry(5))
    old["file_digest"] = None  # as published by a dispatcher before BudgetPolicy v2
    assert budgets_file_action(_entry(5), old) == "unchanged"
    assert budgets_file_action(_entry(7), old) == "publish"


def test_kept_scopes_are_named_and_the_rest_published(caplog: pytest.LogCaptureFixture) -> None:
    stopped = policy_record(_entry(1), "admin-key", _entry(5).digest())
    other = parse_policy("user:y", {"limit_usd": 2})
    publish, kept = apply_budgets_file([_entry(5), other], {"user:x": stopped})
    assert kept == ["user:x"]
    assert [r["scope"] for r in publish] == ["user:y"]
    assert publish[0]["updated_by"] == "budgets_file" and publish[0]["file_digest"]
    assert "user:x" in caplog.text or any(
        getattr(r, "scope", None) == "user:x" for r in caplog.records
    )
    _, kept_here = apply_budgets_file([other], {}, skip={"user:y"})  # changed by this process
    assert kept_here == ["user:y"]


def _other(scope: str, limit_usd: int = 2) -> Policy:
    return parse_policy(scope, {"limit_usd": limit_usd})


def test_a_scope_the_file_published_and_no_longer_names_is_removed_once() -> None:
    """An entry deleted from the file: the cap the file published is removed (it stayed
    enforced); one the API changed since the file published it, or never from the file,
    stays; the removal is not repeated, and naming the scope again publishes it."""
    dropped = file_policy_record(_other("user:dropped"))
    old_file = file_policy_record(_other("user:old"))
    old_file["file_digest"] = None  # published before records carried the digest
    changed = policy_record(_other("user:changed", 1), "admin-key", _other("user:changed").digest())
    api_only = policy_record(_other("user:api"), "admin-key", "")
    api_removed = deletion_record("user:gone", "admin-key", _other("user:gone").digest())
    records = {
        "user:x": file_policy_record(_entry(5)),
        "user:dropped": dropped,
        "user:old": old_file,
        "user:changed": changed,
        "user:api": api_only,
        "user:gone": api_removed,
        "user:mine": file_policy_record(_other("user:mine")),
    }
    publish, kept = apply_budgets_file([_entry(5)], records, skip={"user:mine"})
    assert [(r["scope"], r["deleted"]) for r in publish] == [
        ("user:dropped", True),
        ("user:old", True),
    ]
    assert all(r["updated_by"] == "budgets_file" for r in publish)
    assert kept == ["user:changed"]
    again, _ = apply_budgets_file([_entry(5)], {**records, **{r["scope"]: r for r in publish}})
    assert [r["scope"] for r in again] == ["user:mine"], "a removal was published twice"
    assert budgets_file_action(_other("user:dropped"), publish[0]) == "publish"


def test_an_api_change_written_before_records_carried_the_digest_is_kept_and_adopted() -> None:
    """The first start after the upgrade published the file over an older version's API
    change (no digest). It is kept now, republished unchanged naming the file's entry, so the
    next start keeps it too and an edit of the entry applies."""
    old_api = policy_record(_entry(1, "stopped"), "admin-key")
    old_api["file_digest"] = None
    publish, kept = apply_budgets_file([_entry(5)], {"user:x": old_api})
    assert kept == ["user:x"]
    assert len(publish) == 1
    adopted = publish[0]
    assert Policy.from_record(adopted) == Policy.from_record(old_api)
    assert adopted["updated_by"] == "admin-key" and adopted["event_id"] != old_api["event_id"]
    assert adopted["file_digest"] == _entry(5).digest()
    assert budgets_file_action(_entry(5), adopted) == "kept"
    assert budgets_file_action(_entry(6), adopted) == "publish"
    old_removal = deletion_record("user:x", "admin-key")  # an older version's DELETE
    assert budgets_file_action(_entry(5), old_removal) == "adopt"


Op = tuple[str, int]
OPS = st.lists(
    st.tuples(st.sampled_from(["file", "drop", "put", "delete"]), st.integers(1, 3)),
    max_size=12,
)


@given(OPS)
def test_the_file_wins_only_when_its_entry_changed_since_it_last_published(ops: list[Op]) -> None:
    """Any history of starts (with the file's entry then, or without it: "drop") and admin
    changes: a start applies the file's entry exactly when it differs from the entry the file
    last published; an admin change made after that publication otherwise stands; a start
    whose file no longer names the scope removes it when the file's record is the latest.
    The book carries the digest on as the dispatcher's PUT and DELETE do."""
    book = PolicyBook()
    current: dict | None = None
    last_published: Policy | None = None
    for kind, value in ops:
        if kind == "file":
            entry = _entry(value)
            before = current
            publish, _ = apply_budgets_file([entry], {"user:x": current} if current else {})
            if entry != last_published:
                assert [Policy.from_record(r) for r in publish] == [entry]
                current, last_published = publish[0], entry
            else:
                assert publish == []
                assert current is before
        elif kind == "drop":
            publish, _ = apply_budgets_file([], {"user:x": current} if current else {})
            if current and not current["deleted"] and current["updated_by"] == "budgets_file":
                assert [r["deleted"] for r in publish] == [True]
                current, last_published = publish[0], None
            else:
                assert publish == []
        elif kind == "put":
            current = policy_record(_entry(value + 10), "admin", book.file_digest("user:x"))
        else:
            current = deletion_record("user:x", "admin", book.file_digest("user:x"))
        book.apply_record(current, "user:x")


def test_a_change_made_before_the_files_newer_record_was_read_is_sent_again_carrying_it() -> None:
    """A PUT at a replica that had not read another replica's newer file record of the scope
    carried the older entry's digest, so the next start published the file over the PUT.
    Read back after that file record, the change asks to be sent again carrying its digest."""
    book = PolicyBook()
    book.apply_record(file_policy_record(_entry(5)), "user:x")
    stop = policy_record(_entry(1), "admin", book.file_digest("user:x"))  # carries entry 5's
    book.put_local(Policy.from_record(stop), stop["event_id"], stop, carries_file_digest=True)
    newer = file_policy_record(_entry(7))  # another replica's start; landed before the stop
    book.apply_record(newer, "user:x")  # older than the own write: skipped
    assert (
        book.policies["user:x"] == _entry(1, None)
        and book.take_file_digest_resend("user:x") is None
    )
    book.apply_record(stop, "user:x")
    digest = book.take_file_digest_resend("user:x")
    assert digest == _entry(7).digest()
    again = with_file_digest(stop, digest)
    assert Policy.from_record(again) == Policy.from_record(stop)
    assert again["updated_by"] == "admin" and again["event_id"] != stop["event_id"]
    assert budgets_file_action(_entry(7), again) == "kept"  # not the file over the stop
    book.put_local(Policy.from_record(again), again["event_id"], again, carries_file_digest=True)
    book.apply_record(again, "user:x")
    assert book.take_file_digest_resend("user:x") is None  # nothing passed over: nothing more
    assert book.file_digest("user:x") == _entry(7).digest()

    # a change that knew the newest record, and the file's own records: nothing to send again
    known = policy_record(_entry(2), "admin", book.file_digest("user:x"))
    book.put_local(Policy.from_record(known), known["event_id"], known, carries_file_digest=True)
    book.apply_record(known, "user:x")
    assert book.take_file_digest_resend("user:x") is None
    own_file = file_policy_record(_entry(8))
    book.put_local(Policy.from_record(own_file), own_file["event_id"], own_file)
    book.apply_record(policy_record(_entry(3), "admin", "other"), "user:x")
    book.apply_record(own_file, "user:x")
    assert book.take_file_digest_resend("user:x") is None
