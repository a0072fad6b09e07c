"""Money at the edges: exact decimal dollars from integer nano-dollars and back."""

from __future__ import annotations

import pytest

from deepserve.billing.money import dollars, parse_dollars


@pytest.mark.parametrize(("nanodollars", "text"), [
    (0, "0.00"), (5_000_000_000, "5.00"), (12_500_000_000, "12.50"), (1_234, "0.000001234"), (1, "0.000000001"),
    (-2_500_000_000, "-2.50"), (10**18, "1000000000.00"),
])
def test_dollars_are_exact_with_cents_always(nanodollars, text):
    assert dollars(nanodollars) == text
    assert parse_dollars(text) == nanodollars


@pytest.mark.parametrize("bad", ["ten", "1e400000", "nan", "inf", "0.0000000001", ""])
def test_amounts_that_are_not_whole_nanodollars_are_refused_with_the_reason(bad):
    with pytest.raises(ValueError):
        parse_dollars(bad)


def test_dollar_signs_and_integers_are_accepted():
    assert parse_dollars("$3") == parse_dollars(3) == 3_000_000_000
