"""The admin API under /admin/, for operators' scripts: accounts, keys, credits, usage, prices.

Guarded by the admin key (`--admin-key` / DEEPSERVE_ADMIN_KEY) sent as `Authorization: Bearer <admin key>`;
without one configured the admin API answers 403. Errors use the OpenAI envelope. Keys are shown once, in the
answer to POST /admin/keys; afterwards only their prefix and id.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse

from deepserve.api.admin.schemas import AccountCreate, CreditGrant, KeyCreate, PriceSet
from deepserve.api.auth import bearer_token
from deepserve.billing import accounts, keys, usage
from deepserve.billing.money import TokenPrices
from deepserve.errors import AuthenticationError, InvalidRequestError, NotFoundError, PermissionDeniedError

PREFIX = "/admin"


async def require_admin(request: Request) -> None:
    admin_key = request.app.state.settings.admin_key
    if not admin_key:
        raise PermissionDeniedError(
            "The admin API is off: start the server with --admin-key KEY (or DEEPSERVE_ADMIN_KEY) to use it.")
    given = bearer_token(request)
    if given is None:
        raise AuthenticationError("The admin API needs the admin key as 'Authorization: Bearer <admin key>'.")
    if not hmac.compare_digest(given.encode(), admin_key.encode()):
        raise AuthenticationError("Incorrect admin key provided.")


router = APIRouter(prefix=PREFIX, tags=["Admin"], dependencies=[Depends(require_admin)])


async def _run(request: Request, fn, *args, **kwargs):
    """A billing operation on the database threads; its LookupError/ValueError become 404/400."""
    try:
        return await request.app.state.billing.db.run(fn, *args, **kwargs)
    except LookupError as exc:
        raise NotFoundError(str(exc.args[0] if exc.args else exc)) from None
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [a.to_json() for a in await _run(request, accounts.list_accounts)]}


@router.post("/accounts", status_code=201)
async def create_account(body: AccountCreate, request: Request) -> dict[str, Any]:
    account_id = await _run(request, accounts.ensure_account, body.name)
    return (await _run(request, accounts.get_account, account_id)).to_json()


@router.get("/accounts/{name}")
async def get_account(name: str, request: Request) -> dict[str, Any]:
    return (await _run(request, accounts.get_account, name)).to_json()


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request) -> dict[str, Any]:
    account_id = await _run(request, accounts.ensure_account, body.account)
    key, info = await _run(
        request, keys.create_key, account_id, name=body.name, expires_at=body.expiry(),
        allowed_models=body.allowed_models, rpm_limit=body.rpm_limit, tpm_limit=body.tpm_limit,
    )
    return {"key": key, **info.to_json()}  # the only time the key is shown


@router.get("/keys")
async def list_keys(request: Request, account: str | None = None, include_revoked: bool = True) -> dict[str, Any]:
    account_id = (await _run(request, accounts.get_account, account)).id if account else None
    infos = await _run(request, keys.list_keys, account_id=account_id, include_revoked=include_revoked)
    return {"object": "list", "data": [i.to_json() for i in infos]}


async def _revoke(key_ref: str, request: Request) -> dict[str, Any]:
    info = await _run(request, keys.find_key, key_ref)
    return (await _run(request, keys.revoke_key, info.id)).to_json()


@router.delete("/keys/{key_ref}")
async def revoke_key(key_ref: str, request: Request) -> dict[str, Any]:
    """Revoke a key by id or prefix: it gets 401 from the next request on."""
    return await _revoke(key_ref, request)


@router.post("/keys/{key_ref}/revoke")
async def revoke_key_post(key_ref: str, request: Request) -> dict[str, Any]:
    return await _revoke(key_ref, request)


@router.post("/credits")
async def grant_credits(body: CreditGrant, request: Request) -> dict[str, Any]:
    account_id = await _run(request, accounts.ensure_account, body.account)
    info = await _run(request, accounts.grant, account_id, body.nanodollars(), kind=body.kind, note=body.note)
    return info.to_json()


@router.get("/usage")
async def get_usage(
    request: Request, account: str | None = None, key_id: int | None = None, model: str | None = None,
    since: str | None = None, until: str | None = None,
) -> dict[str, Any]:
    account_id = (await _run(request, accounts.get_account, account)).id if account else None
    rows = await _run(request, usage.report, account_id=account_id, key_id=key_id, model=model, since=since,
                      until=until)
    return {"object": "list", "data": [r.to_json() for r in rows]}


@router.get("/prices")
async def list_prices(request: Request) -> dict[str, Any]:
    """The price of every served model (the operator's, else the catalog's, else free), and every override."""
    overrides = await _run(request, accounts.price_overrides)
    served = []
    for model in getattr(request.app.state, "models", []):
        catalog = model.catalog.prices if model.catalog else None
        names = (model.model_id, *(n for n in (model.catalog.names if model.catalog else ()) if n != model.model_id))
        price, source = accounts.resolve_price(
            overrides, names, TokenPrices(catalog.input, catalog.cached_input, catalog.output) if catalog else None)
        served.append({"model": model.model_id, "source": source, **_price_json(price)})
    return {"served": served, "overrides": {m: _price_json(p) for m, p in overrides.items()}}


def _price_json(price: TokenPrices) -> dict[str, Any]:
    return {"unit": "nanodollars_per_million_tokens", "input": price.input, "cached_input": price.cached_input,
            "output": price.output}


@router.put("/prices/{model_id:path}")
async def set_price(model_id: str, body: PriceSet, request: Request) -> dict[str, Any]:
    price = TokenPrices(body.input, body.input if body.cached_input is None else body.cached_input, body.output)
    await _run(request, accounts.set_price, model_id, price)
    return {"model": model_id, "source": "operator", **_price_json(price)}


@router.delete("/prices/{model_id:path}")
async def delete_price(model_id: str, request: Request) -> JSONResponse:
    if not await _run(request, accounts.delete_price, model_id):
        raise NotFoundError(f"No operator price for `{model_id}`: it uses the catalog's (or is free).")
    return JSONResponse({"model": model_id, "deleted": True})


def install(app: FastAPI) -> None:
    app.include_router(router)
