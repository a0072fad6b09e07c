"""Money: integer nano-dollars (1e-9 USD) inside, decimal dollar strings at the edges; costs from counts.

Prices are nano-dollars per million tokens, so a cost is sum(tokens x price) / 1e6 nano-dollars: the sum is
taken first and rounded up once (a request never costs less than its tokens are worth, and never more than
one nano-dollar above).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

NANODOLLARS_PER_DOLLAR = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
MAX_DOLLARS = 10**9  # one amount at most: 10**18 nano-dollars, well inside a 64-bit column


@dataclass(slots=True, frozen=True)
class TokenPrices:
    """Nano-dollars per million tokens. A model without a price is free: all zero."""

    input: int = 0
    cached_input: int = 0
    output: int = 0

    @property
    def is_free(self) -> bool:
        return not (self.input or self.cached_input or self.output)


FREE = TokenPrices()


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def cost(prices: TokenPrices, *, num_prompt: int, num_cached: int, num_completion: int) -> int:
    """What the counted tokens cost: cached prompt tokens at the cached price, the rest at the input price."""
    num_cached = min(num_cached, num_prompt)
    total = (num_prompt - num_cached) * prices.input + num_cached * prices.cached_input + num_completion * prices.output
    return _ceil_div(total, TOKENS_PER_PRICE_UNIT)


def worst_case_cost(prices: TokenPrices, *, num_prompt: int, max_completion: int) -> int:
    """The most a request can cost: every prompt token at the dearer prompt price, every allowed output token.
    `cost()` of any usage within these counts is never above it."""
    total = num_prompt * max(prices.input, prices.cached_input) + max_completion * prices.output
    return _ceil_div(total, TOKENS_PER_PRICE_UNIT)


def affordable_completion(prices: TokenPrices, *, num_prompt: int, available: int) -> int | None:
    """The most completion tokens whose worst case `available` covers beside the prompt (None: not even the
    prompt; any number when output is free)."""
    room = available * TOKENS_PER_PRICE_UNIT - num_prompt * max(prices.input, prices.cached_input)
    if room < 0:
        return None
    return room // prices.output if prices.output else 2**62


def dollars(nanodollars: int, *, min_decimals: int = 2) -> str:
    """12.5 USD -> "12.50"; 0.000001234 USD -> "0.000001234": exact (integers), cents always shown."""
    sign = "-" if nanodollars < 0 else ""
    whole, fraction = divmod(abs(nanodollars), NANODOLLARS_PER_DOLLAR)
    digits = f"{fraction:09d}".rstrip("0").ljust(min_decimals, "0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def parse_dollars(text: str | int | float | Decimal) -> int:
    """"12.50" (or "$12.50") -> 12_500_000_000 nano-dollars; more than 9 decimals (below a nano-dollar) is refused."""
    raw = str(text).strip().removeprefix("$")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not an amount of dollars (e.g. 10 or 0.25)") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not an amount of dollars (e.g. 10 or 0.25)")
    if abs(value) > MAX_DOLLARS:
        raise ValueError(f"{text!r} is more than the largest amount, {MAX_DOLLARS} dollars")
    scaled = value * NANODOLLARS_PER_DOLLAR
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{text!r} has more than 9 decimals: the smallest unit is one nano-dollar (0.000000001)")
    return int(scaled)
