"""`deepserve keys`: API keys in the billing database (create, list, revoke). A key is printed once, at
creation; the database keeps only its sha256."""

from __future__ import annotations

import datetime as dt
import json

import typer

from deepserve.cli_db import DATA_DIR_HELP, DATABASE_URL_HELP, fail, open_engine, print_table

app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)


@app.command("create")
def create(
    account: str = typer.Option(..., help="Account the key spends from (created if it does not exist)."),
    name: str = typer.Option(None, help="A label for the key."),
    expires_in_days: float = typer.Option(None, help="The key stops working after this many days."),
    allow_model: list[str] = typer.Option(None, "--allow-model", help="Model id or alias it may use (repeatable; default: all)."),
    rpm: int = typer.Option(None, help="Requests per minute (default: no limit)."),
    tpm: int = typer.Option(None, help="Tokens per minute, prompt + max_tokens (default: no limit)."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the key in `key`)."),
) -> None:
    """Create a key. It is printed once (last line, alone): store it now."""
    from deepserve.billing import accounts, keys

    engine = open_engine(url, data_dir)
    expires_at = None
    if expires_in_days is not None:
        if expires_in_days <= 0:
            fail("--expires-in-days must be above 0")
        expires_at = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=expires_in_days)
    try:
        account_id = accounts.ensure_account(engine, account)
        key, info = keys.create_key(engine, account_id, name=name, expires_at=expires_at,
                                    allowed_models=allow_model or None, rpm_limit=rpm, tpm_limit=tpm)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"key": key, **info.to_json()}))
        return
    typer.echo(f"key {info.id} ({info.prefix}…) for account {info.account}; it is shown once, store it now:")
    typer.echo(key)


@app.command("list")
def list_keys(
    account: str = typer.Option(None, help="Only this account's keys."),
    active: bool = typer.Option(False, "--active", help="Leave out revoked keys."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every key: id, prefix, account, state, expiry, allowed models and limits (never the key)."""
    from deepserve.billing import accounts, keys

    engine = open_engine(url, data_dir)
    try:
        account_id = accounts.get_account(engine, account).id if account else None
    except LookupError as exc:
        fail(str(exc.args[0]))
    infos = keys.list_keys(engine, account_id=account_id, include_revoked=not active)
    if as_json:
        typer.echo(json.dumps([i.to_json() for i in infos], indent=2))
        return
    rows = [[str(i.id), i.prefix + "…", i.account, i.name or "", i.state, i.created_at.strftime("%Y-%m-%d %H:%M"),
             i.expires_at.strftime("%Y-%m-%d %H:%M") if i.expires_at else "", ",".join(i.allowed_models or []) or "all",
             str(i.rpm_limit or ""), str(i.tpm_limit or "")] for i in infos]
    print_table(["ID", "PREFIX", "ACCOUNT", "NAME", "STATE", "CREATED (UTC)", "EXPIRES", "MODELS", "RPM", "TPM"], rows)


@app.command("revoke")
def revoke(
    key: str = typer.Argument(..., metavar="ID_OR_PREFIX", help="The key's id or prefix (see `deepserve keys list`)."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Revoke a key: from its next request on it gets 401, on every server using this database."""
    from deepserve.billing import keys

    engine = open_engine(url, data_dir)
    try:
        info = keys.revoke_key(engine, keys.find_key(engine, key).id)
    except LookupError as exc:
        fail(str(exc.args[0]))
    if as_json:
        typer.echo(json.dumps(info.to_json()))
    else:
        typer.echo(f"key {info.id} ({info.prefix}…) of account {info.account} revoked")
