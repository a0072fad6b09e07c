"""`GET /user/balance`: a key's own balance in DeepSeek's shape.

    {"is_available": true, "balance_infos": [{"currency": "USD", "total_balance": "4.99",
      "granted_balance": "1.00", "topped_up_balance": "3.99"}]}

Amounts are dollars as decimal strings (cents always, more digits when there are any). `total_balance` is
the ledger balance; `is_available` says whether anything of it is free to spend (not held by requests in
flight). Grants are spent before top-ups, as DeepSeek spends granted balance first. A key that is not metered
(an operator key from configuration, --no-auth) is always available and has no balance_infos.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from deepserve.api.auth import Principal, require_bearer
from deepserve.billing.accounts import get_account
from deepserve.billing.money import dollars

router = APIRouter(tags=["Billing"])


@router.get("/user/balance", summary="The calling key's account balance (DeepSeek's shape)")
async def user_balance(request: Request, principal: Principal = Depends(require_bearer)) -> dict[str, Any]:
    if not principal.is_metered:
        return {"is_available": True, "balance_infos": []}
    account = await request.app.state.billing.db.run(get_account, principal.account_id)
    request.state.remaining_nanodollars = account.available
    return {
        "is_available": account.available > 0,
        "balance_infos": [{
            "currency": "USD",
            "total_balance": dollars(account.balance),
            "granted_balance": dollars(account.granted),
            "topped_up_balance": dollars(account.topped_up),
        }],
    }
