"""Request bodies of the admin API (pydantic). Money in is decimal dollars ("10", "0.25") or integer
nano-dollars; prices are integer nano-dollars per million tokens, as in the catalog and GET /v1/models."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepserve.billing.money import parse_dollars


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Body):
    name: str = Field(min_length=1, max_length=200)


class KeyCreate(_Body):
    account: str = Field(min_length=1, max_length=200, description="account name; created if it does not exist")
    name: str | None = Field(None, max_length=200, description="a label for the key")
    expires_at: dt.datetime | None = Field(None, description="ISO 8601; a naive time is UTC")
    expires_in_days: float | None = Field(None, gt=0)
    allowed_models: list[str] | None = Field(None, description="model ids or aliases; absent: every model")
    rpm_limit: int | None = Field(None, ge=1, description="requests per minute")
    tpm_limit: int | None = Field(None, ge=1, description="tokens per minute (prompt + max_tokens x n)")

    def expiry(self) -> dt.datetime | None:
        if self.expires_at is not None:
            value = self.expires_at
            if value.tzinfo is not None:
                value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value
        if self.expires_in_days is not None:
            return dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=self.expires_in_days)
        return None


class CreditGrant(_Body):
    account: str = Field(min_length=1, max_length=200, description="account name; created if it does not exist")
    amount_usd: str | None = Field(None, description='dollars as a decimal string, e.g. "10" or "-2.50"')
    amount_nanodollars: int | None = None
    kind: str = Field("grant", pattern="^(grant|top_up|adjust)$")
    note: str | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _one_amount(self) -> CreditGrant:
        if (self.amount_usd is None) == (self.amount_nanodollars is None):
            raise ValueError("give exactly one of amount_usd and amount_nanodollars")
        if self.amount_usd is not None:
            parse_dollars(self.amount_usd)  # ValueError says what is wrong
        return self

    def nanodollars(self) -> int:
        return self.amount_nanodollars if self.amount_nanodollars is not None else parse_dollars(self.amount_usd)


class PriceSet(_Body):
    input: int = Field(ge=0, description="nano-dollars per million prompt tokens")
    cached_input: int | None = Field(None, ge=0, description="per million cached prompt tokens (default: input)")
    output: int = Field(ge=0, description="nano-dollars per million completion tokens")
