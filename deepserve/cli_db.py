"""`deepserve db`: the billing database's schema (Alembic migrations shipped in the package).

Every billing command (keys, credits, usage, prices) and `deepserve serve` bring the schema up to date
themselves; `deepserve db upgrade` does only that, e.g. before starting replicas on a new PostgreSQL.
"""

from __future__ import annotations

import json

import typer
from sqlalchemy.engine import Engine

from deepserve.config import Settings

app = typer.Typer(help="The billing database (SQLite file by default, PostgreSQL by URL).", no_args_is_help=True)

DATABASE_URL_HELP = ("SQLAlchemy URL of the billing database (default: DEEPSERVE_DATABASE_URL, else deepserve.db "
                     "in the data dir), e.g. postgresql+psycopg://user:password@host:5432/deepserve.")
DATA_DIR_HELP = "Data folder holding the default SQLite database (default: DEEPSERVE_DATA_DIR)."


def database_url(database_url: str | None, data_dir: str | None = None) -> str:
    overrides = {k: v for k, v in (("database_url", database_url), ("data_dir", data_dir)) if v}
    return Settings(**overrides).resolved_database_url


def open_engine(url: str | None, data_dir: str | None = None) -> Engine:
    """The billing database, migrated to the newest schema; a failure ends the command with its reason."""
    from sqlalchemy.exc import SQLAlchemyError

    from deepserve.billing import db

    resolved = database_url(url, data_dir)
    try:
        engine = db.create_db_engine(resolved, pool_size=2)
        db.upgrade(engine)
    except SQLAlchemyError as exc:
        typer.echo(f"deepserve: cannot use the database {db.describe(resolved)}: {exc.__class__.__name__}: "
                   f"{str(exc.orig if hasattr(exc, 'orig') else exc).strip()}", err=True)
        raise typer.Exit(1) from exc
    return engine


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"deepserve: {message}", err=True)
    raise typer.Exit(code)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    lines = [header] + rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


@app.command("upgrade")
def upgrade(
    revision: str = typer.Argument("head", help="Schema revision to reach (default: the newest)."),
    url: str = typer.Option(None, "--database-url", help=DATABASE_URL_HELP),
    data_dir: str = typer.Option(None, help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create or migrate the billing tables (safe to run again, and by several processes at once)."""
    from deepserve.billing import db

    resolved = database_url(url, data_dir)
    engine = db.create_db_engine(resolved, pool_size=1)
    before = db.current_revision(engine) if revision else None
    after = db.upgrade(engine, revision)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps({"database": db.describe(resolved), "from": before, "to": after}))
    else:
        typer.echo(f"{db.describe(resolved)}: schema at revision {after}" + (f" (was {before})" if before != after else ""))
