"""`tollgate budgets list` and `budgets status` print one line per scope, the scope first in
a 32-character column. A newcomer's probe saw a 261-character scope (ids may be 256
characters) push that line's columns far right and out of line with the others."""

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
