"""`deepserve prices`: the operator's token prices, overriding the catalog's (a model with neither is free).
Given in US dollars per million tokens; stored as integer nano-dollars per million tokens."""

from __future__ import annotations

import json

import typer

from deepserve.cli_db import DATA_DIR_HELP, DATABASE_URL_HELP, fail, open_engine, print_table

app = typer.Typer(help="Token prices: list, set, unset (override the catalog's).", no_args_is_help=True)


@app.command("list")
def list_prices(
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (nano-dollars per million tokens)."),
) -> None:
    """Every catalog price and every operator override."""
    from deepserve.billing.accounts import price_overrides, resolve_price
    from deepserve.billing.money import TokenPrices, dollars
    from deepserve.catalog import default_catalog

    overrides = price_overrides(open_engine(url, data_dir))
    rows = []
    named = set()  # override names that belong to a catalog model (its id or an alias)
    for entry in default_catalog():
        named.update(entry.names)
        catalog = TokenPrices(entry.prices.input, entry.prices.cached_input, entry.prices.output) if entry.prices \
            else None
        price, source = resolve_price(overrides, entry.names, catalog)
        if source == "free":
            continue
        rows.append({"model": entry.id, "source": source, "input": price.input,
                     "cached_input": price.cached_input, "output": price.output})
    rows += [{"model": m, "source": "operator", "input": p.input, "cached_input": p.cached_input, "output": p.output}
             for m, p in overrides.items() if m not in named]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(["MODEL", "SOURCE", "INPUT $/M", "CACHED INPUT $/M", "OUTPUT $/M"],
                [[r["model"], r["source"], dollars(r["input"]), dollars(r["cached_input"]), dollars(r["output"])]
                 for r in rows])


@app.command("set")
def set_price(
    model: str = typer.Argument(..., help="The model id the server serves it under."),
    input_usd: str = typer.Option(..., "--input", help="Dollars per million prompt tokens, e.g. 0.14."),
    output_usd: str = typer.Option(..., "--output", help="Dollars per million completion tokens."),
    cached_usd: str = typer.Option(
        None, "--cached-input",
        help="Dollars per million cached prompt tokens (default: the catalog's discount on --input, else --input)."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Set the operator's price of a model (servers use it from their next request on)."""
    from deepserve.billing.accounts import set_price as store_price
    from deepserve.billing.money import TokenPrices, parse_dollars

    from deepserve.billing.money import dollars
    from deepserve.catalog import default_catalog

    try:
        input_price = parse_dollars(input_usd)
        if cached_usd is not None:
            cached_price = parse_dollars(cached_usd)
        else:  # keep the catalog's cache discount (deepseek-r1: $0.14 of $0.55), not the full input price
            entry = default_catalog().find(model)
            listed = entry.prices if entry is not None else None
            cached_price = (input_price * listed.cached_input // listed.input if listed and listed.input
                            else input_price)
        prices = TokenPrices(input_price, cached_price, parse_dollars(output_usd))
        store_price(open_engine(url, data_dir), model, prices)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"model": model, "unit": "nanodollars_per_million_tokens", "input": prices.input,
                               "cached_input": prices.cached_input, "output": prices.output}))
    else:
        typer.echo(f"{model}: ${dollars(prices.input)} in, ${dollars(prices.cached_input)} cached in, "
                   f"${dollars(prices.output)} out per million tokens")


@app.command("unset")
def unset_price(
    model: str = typer.Argument(..., help="The model id."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
) -> None:
    """Drop the operator's price: the catalog's applies again (or none: free)."""
    from deepserve.billing.accounts import delete_price

    if not delete_price(open_engine(url, data_dir), model):
        fail(f"no operator price for {model!r}")
    typer.echo(f"{model}: operator price removed")
