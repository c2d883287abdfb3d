from pathlib import Path

import pytest

from app.budgets.admin import load_budgets_file
from app.budgets.policy import PolicyError


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
