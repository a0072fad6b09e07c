"""`deepserve usage`: what was used and charged, by day (UTC), key and model; a table, --csv or --json."""

from __future__ import annotations

import csv
import json
import sys

import typer

from deepserve.cli_db import DATA_DIR_HELP, DATABASE_URL_HELP, fail, open_engine, print_table

app = typer.Typer(help="Usage by day, key and model.")


@app.callback(invoke_without_command=True)
def usage(
    account: str = typer.Option(None, help="Only this account."),
    key: str = typer.Option(None, help="Only this key (id or prefix)."),
    model: str = typer.Option(None, help="Only this model id."),
    since: str = typer.Option(None, help="From this day on (YYYY-MM-DD, UTC, inclusive)."),
    until: str = typer.Option(None, help="Up to this day (YYYY-MM-DD, UTC, inclusive)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Requests, tokens (prompt, cached, completion, reasoning) and cost per day, key and model."""
    from deepserve.billing import accounts, keys
    from deepserve.billing.usage import COLUMNS, report

    engine = open_engine(url, data_dir)
    try:
        account_id = accounts.get_account(engine, account).id if account else None
        key_id = keys.find_key(engine, key).id if key else None
    except LookupError as exc:
        fail(str(exc.args[0]))
    rows = report(engine, account_id=account_id, key_id=key_id, model=model, since=since, until=until)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r.to_json()[c] for c in COLUMNS])
    else:
        print_table(
            ["DAY", "ACCOUNT", "KEY", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "REASONING", "COST $"],
            [[r.day, r.account, f"{r.key_id} ({r.key_prefix}…)" if r.key_id else "", r.model, str(r.num_requests),
              str(r.num_prompt_tokens), str(r.num_cached_tokens), str(r.num_completion_tokens),
              str(r.num_reasoning_tokens), r.cost_usd] for r in rows],
        )
