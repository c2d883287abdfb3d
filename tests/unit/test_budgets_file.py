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
    api = policy_record(_entry(3), "admin-key")  # set through the API before the file named it
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


Op = tuple[str, int]
OPS = st.lists(
    st.tuples(st.sampled_from(["file", "put", "delete"]), st.integers(1, 3)), max_size=12
)


@given(OPS)
def test_the_file_wins_only_when_its_entry_changed_since_it_last_published(ops: list[Op]) -> None:
    """Any history of starts (with the file's entry then) and admin changes: a start applies
    the file's entry exactly when it differs from the entry the file last published; an admin
    change made after that publication otherwise stands. The book carries the digest on as the
    dispatcher's PUT and DELETE do."""
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
        elif kind == "put":
            current = policy_record(_entry(value + 10), "admin", book.file_digests.get("user:x"))
        else:
            current = deletion_record("user:x", "admin", book.file_digests.get("user:x"))
        book.apply_record(current, "user:x")
