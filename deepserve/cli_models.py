"""`deepserve models`: the catalog, and the weights on this machine (list, pull, add, remove)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from deepserve.catalog import NANODOLLARS_PER_DOLLAR, CatalogEntry, default_catalog
from deepserve.catalog.pull import PullError
from deepserve.catalog.registry import LocalModel, LocalRegistry
from deepserve.config import Settings

app = typer.Typer(help="The model catalog and the weights on this machine.", no_args_is_help=True)

_DATA_DIR_HELP = "Registry and weights folder (default: DEEPSERVE_DATA_DIR or ~/.local/share/deepserve)."


def _registry(data_dir: str | None) -> LocalRegistry:
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    return LocalRegistry(settings.data_dir)


def _weights(entry: CatalogEntry | None, local: LocalModel | None) -> dict[str, Any]:
    """Where this model's weights are: present (path), missing (registered, file gone), absent, bundled, upstream."""
    if entry is not None and entry.bundled:
        from deepserve.bundled import bundled_model_path

        try:
            return {"status": "bundled", "path": str(bundled_model_path())}
        except FileNotFoundError:
            return {"status": "missing", "path": None}
    if entry is not None and not entry.can_run_in_process:
        return {"status": "upstream", "path": None}
    if local is None:
        return {"status": "absent", "path": None}
    return {"status": "present" if local.is_present else "missing", "path": local.path}


def _row(entry: CatalogEntry | None, local: LocalModel | None) -> dict[str, Any]:
    if entry is None:  # registered by hand under a name the catalog does not know
        assert local is not None
        return {"id": local.id, "in_catalog": False, "weights": _weights(None, local), "template": local.template}
    prices = entry.prices
    return {
        "id": entry.id,
        "in_catalog": True,
        "aliases": list(entry.aliases),
        "family": entry.family,
        "architecture": entry.architecture,
        "owned_by": entry.owned_by,
        "engine": entry.engine,
        "num_parameters": entry.num_parameters,
        "num_active_parameters": entry.num_active_parameters,
        "context_window": entry.context_window,
        "default_max_tokens": entry.default_max_tokens,
        "max_tokens_limit": entry.max_tokens_limit,
        "temperature": entry.temperature,
        "top_p": entry.top_p,
        "prices_nanodollars_per_million_tokens": (
            {"input": prices.input, "cached_input": prices.cached_input, "output": prices.output} if prices else None
        ),
        "chat_template": (local.template if local and local.template else entry.chat_template),
        "reasoning": entry.reasoning,
        "fim": (
            {"prefix": entry.fim.prefix, "suffix": entry.fim.suffix, "middle": entry.fim.middle} if entry.fim else None
        ),
        "quants": list(entry.gguf),
        "weights": _weights(entry, local),
    }


def _dollars(nanodollars: int) -> str:
    """$0.10, $2.19, $0.0005: cents always, more digits only when the price has them (Decimal: exact)."""
    text = format(Decimal(nanodollars) / NANODOLLARS_PER_DOLLAR, "f")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _count(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("B", 10**9), ("M", 10**6)):
        if n >= size:
            return f"{Decimal(n) / size:f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _table_line(row: dict[str, Any]) -> list[str]:
    weights = row["weights"]
    where = {"present": weights["path"], "bundled": f"bundled ({weights['path']})",
             "missing": f"missing ({weights['path']})", "absent": "not pulled",
             "upstream": "upstream engine only"}[weights["status"]]
    if not row["in_catalog"]:
        return [row["id"], "(local)", "", "", "", "", where]
    params = _count(row["num_parameters"])
    if row["num_active_parameters"]:
        params += f" ({_count(row['num_active_parameters'])} active)"
    prices = row["prices_nanodollars_per_million_tokens"]
    price = f"{_dollars(prices['input'])} / {_dollars(prices['output'])}" if prices else ""
    return [row["id"], row["family"], row["architecture"], params, str(row["context_window"]), price, where]


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per model) instead of a table."),
    data_dir: str = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Every catalog model, and every locally registered one, with where its weights are."""
    catalog = default_catalog()
    registry = _registry(data_dir)
    local = {m.id: m for m in registry.all()}
    rows = [_row(entry, local.get(entry.id)) for entry in catalog]
    rows += [_row(None, m) for m in local.values() if catalog.find(m.id) is None]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    header = ["ID", "FAMILY", "ARCH", "PARAMS", "CONTEXT", "$/M IN / OUT", "WEIGHTS"]
    lines = [header] + [_table_line(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])


@app.command("pull")
def pull_model(
    model_id: str = typer.Argument(..., metavar="ID", help="Catalog id or alias (see `deepserve models list`)."),
    quant: str = typer.Option(None, help="Quantisation, e.g. Q4_K_M (default) or Q8_0."),
    data_dir: str = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Download a catalog model's GGUF from the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN), verify it, register it."""
    from deepserve.catalog.pull import pull

    entry = default_catalog().find(model_id)
    if entry is None:
        typer.echo(f"deepserve: {model_id!r} is not in the catalog (`deepserve models list` shows it); "
                   f"for other weights use `deepserve models add {model_id} --gguf PATH`.", err=True)
        raise typer.Exit(2)
    registry = _registry(data_dir)
    try:
        if entry.can_pull:
            source = entry.source(quant)
            typer.echo(f"pulling {entry.id}: {source.repo}/{source.file} into {registry.models_dir / source.repo}")
        model = pull(entry, registry, quant=quant,
                     on_verify=lambda path: typer.echo(f"verifying size and sha256 of {path}"))
    except (PullError, KeyError) as exc:
        typer.echo(f"deepserve: {exc.args[0]}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{model.id} ready: {model.path} ({model.size_bytes} bytes, sha256 {model.sha256})")
    typer.echo(f"serve it with: deepserve serve --model {model.id}")


@app.command("add")
def add_model(
    model_id: str = typer.Argument(..., metavar="ID", help="Catalog id or alias, or any name of your own."),
    gguf: Path = typer.Option(..., "--gguf", help="The GGUF file (registered where it is; not copied)."),
    template: str = typer.Option(None, help="Built-in chat template to use instead of the GGUF's own."),
    data_dir: str = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Register local GGUF weights under an id, so `deepserve serve` serves them."""
    from deepserve.catalog.pull import add

    try:
        model = add(_registry(data_dir), default_catalog(), model_id, gguf, template=template)
    except PullError as exc:
        typer.echo(f"deepserve: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{model.id} registered: {model.path}")
    typer.echo(f"serve it with: deepserve serve --model {model.id}")


@app.command("remove")
def remove_model(
    model_id: str = typer.Argument(..., metavar="ID", help="Registered id or catalog alias."),
    delete_files: bool = typer.Option(
        False, "--delete-files", help="Also delete the GGUF, if `deepserve models pull` downloaded it."
    ),
    data_dir: str = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Unregister a model, so `deepserve serve` no longer serves it (a running server keeps it until restarted)."""
    from deepserve.catalog.pull import pulled_here, remove

    registry = _registry(data_dir)
    try:
        model, deleted = remove(registry, default_catalog(), model_id, delete_files=delete_files)
    except PullError as exc:
        typer.echo(f"deepserve: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{model.id} unregistered")
    for path in deleted:
        typer.echo(f"deleted {path}")
    if not delete_files:
        typer.echo(f"kept {model.path} (`--delete-files` deletes what `models pull` downloaded)")
    elif not pulled_here(registry, model):
        typer.echo(f"kept {model.path}: deepserve did not download it (it was registered with `models add`)")
    elif Path(model.path) not in deleted:
        typer.echo(f"{model.path} was already gone")
