"""A USD amount read from a request is refused as "below the resolution" exactly when the
one rounding of money, ``usd_to_nanos`` (nano-dollars, ties to even), holds it as $0; an
amount accepted is the amount sent, and what is held is its ``usd_to_nanos``.

``usd_amount`` used to round a second time on its own (a review, L10): the two must agree.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from app.pricing.catalog import usd_to_nanos
from app.validation import usd_amount

HIGH = Decimal(1_000_000_000)
# near the resolution (a nano-dollar) and anywhere up to the highest amount
AMOUNTS = st.one_of(
    st.decimals(min_value=0, max_value=Decimal("0.00000001"), places=12),
    st.decimals(min_value=0, max_value=HIGH, places=15),
)


def _held(value: object) -> int | None:
    """Nano-dollars held for ``value``, or None when it is refused as below the resolution."""
    try:
        amount = usd_amount(value, HIGH)
    except PydanticCustomError as exc:
        assert "resolution" in str(exc), exc
        return None
    assert amount == Decimal(str(value))
    return usd_to_nanos(amount)


@given(AMOUNTS)
@example(Decimal("5E-10"))  # a tie: rounds to even, 0, refused
@example(Decimal("5.000000001E-10"))  # just above the tie: one nano-dollar
@example(Decimal("1.5E-9"))  # a tie: 2
@example(Decimal("2.5E-9"))  # a tie: 2
@example(Decimal("0"))
def test_an_amount_is_refused_exactly_when_usd_to_nanos_holds_it_as_zero(amount: Decimal) -> None:
    for sent in (format(amount, "f"), float(amount)):  # a decimal string, a JSON number
        nanos = usd_to_nanos(Decimal(str(sent)))
        below = Decimal(str(sent)) > 0 and nanos == 0
        assert _held(sent) == (None if below else nanos), sent


@pytest.mark.parametrize(
    ("sent", "held"),
    [
        ("0.0000000005", None),
        ("0.0000000015", 2),
        ("0.0000000025", 2),
        ("4.5000000001", 4_500_000_000),
    ],
)
def test_ties_round_to_even_where_money_is_held(sent: str, held: int | None) -> None:
    assert _held(sent) == held
