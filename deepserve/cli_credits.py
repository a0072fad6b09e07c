"""`deepserve credits`: grant credits to an account, show balances. Amounts are US dollars as decimals
(exact to the nano-dollar); every grant is a ledger row."""

from __future__ import annotations

import json

import typer

from deepserve.cli_db import DATA_DIR_HELP, DATABASE_URL_HELP, fail, open_engine, print_table

app = typer.Typer(help="Credits: grant, show.", no_args_is_help=True)


@app.command("grant")
def grant(
    account: str = typer.Argument(..., help="Account name (created if it does not exist)."),
    amount: str = typer.Argument(..., help='US dollars, e.g. 10 or 0.25 (a deduction: -- -2.50).'),
    kind: str = typer.Option("grant", help="grant (spent first), top_up, or adjust."),
    note: str = typer.Option(None, help="Why: kept on the ledger row."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Add credits to an account (or take them away with a negative amount, never below what is reserved)."""
    from deepserve.billing import accounts
    from deepserve.billing.money import dollars, parse_dollars

    try:
        nanodollars = parse_dollars(amount)
    except ValueError as exc:
        fail(str(exc))
    engine = open_engine(url, data_dir)
    try:
        info = accounts.grant(engine, accounts.ensure_account(engine, account), nanodollars, kind=kind, note=note)
    except (ValueError, LookupError) as exc:
        fail(str(exc.args[0]))
    if as_json:
        typer.echo(json.dumps(info.to_json()))
    else:
        typer.echo(f"{info.name}: {'+' if nanodollars > 0 else ''}{dollars(nanodollars)} USD ({kind}); "
                   f"balance {dollars(info.balance)} USD")


@app.command("show")
def show(
    account: str = typer.Argument(None, help="Account name (default: every account)."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Balances: total, reserved by requests in flight, available, granted and topped-up parts."""
    from deepserve.billing import accounts
    from deepserve.billing.money import dollars

    engine = open_engine(url, data_dir)
    try:
        infos = [accounts.get_account(engine, account)] if account else accounts.list_accounts(engine)
    except LookupError as exc:
        fail(str(exc.args[0]))
    if as_json:
        typer.echo(json.dumps([i.to_json() for i in infos] if not account else infos[0].to_json(), indent=2))
        return
    rows = [[str(i.id), i.name, dollars(i.balance), dollars(i.reserved), dollars(i.available), dollars(i.granted),
             dollars(i.topped_up)] for i in infos]
    print_table(["ID", "ACCOUNT", "BALANCE $", "RESERVED $", "AVAILABLE $", "GRANTED $", "TOPPED UP $"], rows)
