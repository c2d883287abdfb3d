"""`tollgate budgets list` and `budgets status` print one line per scope, the scope first in
a 32-character column. A newcomer's probe saw a 261-character scope (ids may be 256
characters) push that line's columns far right and out of line with the others."""

import pytest

from app.cli import SCOPE_COLUMN, scope_line


def test_a_short_scope_keeps_its_column() -> None:
    assert (
        scope_line("user:alice", "$5 per month UTC")
        == f"{'user:alice':<{SCOPE_COLUMN}} $5 per month UTC"
    )


def test_a_long_scope_is_printed_whole_on_its_own_line_and_its_figures_stay_in_column() -> None:
    scope = "user:" + "x" * 256
    lines = scope_line(scope, "$5 per month UTC").split("\n")
    assert lines[0] == scope  # whole: it is what `tollgate budgets rm` takes
    assert lines[1] == " " * SCOPE_COLUMN + " $5 per month UTC"
    short = scope_line("user:bob", "$5 per month UTC")
    assert short.index("$") == lines[1].index("$")


def test_report_cells_are_shortened_unless_two_names_would_read_the_same() -> None:
    """Probe 52: two 48-character users differing only in their middle printed as one name."""
    from app.cli import TABLE_CELL_WIDTH, shortened_cells

    long = "team-" + "x" * 60 + "-end"
    rows = [[long, "1.5"], ["bob", "2"]]
    shortened = shortened_cells(rows)
    assert len(shortened[0][0]) == TABLE_CELL_WIDTH and "…" in shortened[0][0]
    assert shortened[1] == ["bob", "2"]

    alice = "team-alpha-xxxxxxxxxx-ALICE-yyyyyyyyyyyyyyyyyyyyyy"
    bobby = "team-alpha-xxxxxxxxxx-BOBBY-yyyyyyyyyyyyyyyyyyyyyy"
    whole = shortened_cells([[alice, "1"], [bobby, "2"]])
    assert [row[0] for row in whole] == [alice, bobby]  # told apart
    assert shortened_cells([]) == []


def test_wide_characters_keep_the_columns_in_line() -> None:
    """Probe 52: `user:数据分析团队…` put its amount at column 50 instead of 33, and a CJK
    user's report figures sat 9 columns right: widths were counted in characters."""
    from app.cli import columns, pad

    scope = "user:数据分析团队"  # 5 + 6 characters, 5 + 12 columns
    assert columns(scope) == 17
    line = scope_line(scope, "$5")
    assert columns(line[: line.index("$")]) == SCOPE_COLUMN + 1
    assert columns(pad("数据", 6, right=True)) == 6 and pad("数据", 6, right=True) == "  数据"


def test_a_report_table_lines_up_a_wide_name(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import _table, columns

    _table(
        "Spend by user",
        [{"u": "数据分析", "c": "1.5"}, {"u": "ann", "c": "22.25"}],
        [("user", "u"), ("cost", "c")],
    )
    lines = capsys.readouterr().out.splitlines()[2:]  # a blank line, the title
    assert len({columns(line) for line in lines}) == 1, lines
