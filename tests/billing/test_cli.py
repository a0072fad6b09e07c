"""The operator's commands: keys, credits, usage, prices, db upgrade; tables for people, --json for scripts."""

from __future__ import annotations

import csv
import io
import json

from typer.testing import CliRunner

from deepserve.billing import db, keys, reservations
from deepserve.billing.reservations import Usage
from deepserve.cli import app
from tests.billing.test_store import PRICES

runner = CliRunner()


def deepserve(*args: str, url: str) -> str:
    cut = args.index("--") if "--" in args else len(args)  # options go before a `--`
    result = runner.invoke(app, [*args[:cut], "--database-url", url, *args[cut:]])
    assert result.exit_code == 0, result.output
    return result.output


def test_db_upgrade_creates_the_schema_once(db_url):
    first = json.loads(deepserve("db", "upgrade", "--json", url=db_url))
    assert first["from"] is None and first["to"] == db.head_revision()
    again = json.loads(deepserve("db", "upgrade", "--json", url=db_url))
    assert again["from"] == again["to"] == db.head_revision()
    assert "password" not in first["database"] or "***" in first["database"]


def test_keys_create_list_revoke(db_url):
    created = json.loads(deepserve("keys", "create", "--account", "acme", "--name", "ci", "--allow-model", "m",
                                   "--rpm", "10", "--json", url=db_url))
    key = created["key"]
    assert key.startswith("ds-") and created["account"] == "acme" and created["state"] == "active"
    assert created["allowed_models"] == ["m"] and created["rpm_limit"] == 10
    plain = deepserve("keys", "create", "--account", "acme", url=db_url)
    second_key = plain.strip().splitlines()[-1]  # the key alone on the last line
    assert second_key.startswith("ds-") and second_key != key
    listed = json.loads(deepserve("keys", "list", "--json", url=db_url))
    assert [k["id"] for k in listed] == [created["id"], created["id"] + 1]
    table = deepserve("keys", "list", url=db_url)
    assert created["prefix"] in table and key not in table and second_key not in table
    revoked = json.loads(deepserve("keys", "revoke", created["prefix"], "--json", url=db_url))
    assert revoked["state"] == "revoked"
    assert [k["id"] for k in json.loads(deepserve("keys", "list", "--active", "--json", url=db_url))] == [
        created["id"] + 1]
    missing = runner.invoke(app, ["keys", "revoke", "999", "--database-url", db_url])
    assert missing.exit_code == 1 and "no key" in missing.output


def test_credits_grant_and_show_in_exact_dollars(db_url):
    assert "balance 10.50 USD" in deepserve("credits", "grant", "acme", "10.5", url=db_url)
    deepserve("credits", "grant", "acme", "--kind", "top_up", "--", "0.000000001", url=db_url)
    shown = json.loads(deepserve("credits", "show", "acme", "--json", url=db_url))
    assert shown["balance"] == "10.500000001" and shown["balance_nanodollars"] == 10_500_000_001
    assert shown["granted_balance"] == "10.50" and shown["topped_up_balance"] == "0.000000001"
    refused = runner.invoke(app, ["credits", "grant", "acme", "--database-url", db_url, "--", "-11"])
    assert refused.exit_code == 1 and "available balance" in refused.output
    too_fine = runner.invoke(app, ["credits", "grant", "acme", "0.0000000001", "--database-url", db_url])
    assert too_fine.exit_code == 1 and "9 decimals" in too_fine.output
    assert "acme" in deepserve("credits", "show", url=db_url)


def test_usage_by_day_key_and_model_as_table_csv_and_json(engine, db_url):
    from deepserve.billing import accounts

    account_id = accounts.ensure_account(engine, "acme")
    accounts.grant(engine, account_id, 10**10)
    _, info = keys.create_key(engine, account_id)
    for completion in (3, 4):
        r = reservations.reserve(
            engine, instance_id="i", account_id=account_id, key_id=info.id, rpm_limit=None, tpm_limit=None,
            model_names=("m",), catalog_prices=PRICES, num_prompt_tokens=10, max_completion_tokens=10, now_ms=0)
        reservations.settle(engine, r, Usage(num_prompt=10, num_cached=2, num_completion=completion), endpoint="/x")
    (row,) = json.loads(deepserve("usage", "--json", url=db_url))
    assert (row["account"], row["key_id"], row["model"], row["num_requests"]) == ("acme", info.id, "m", 2)
    assert (row["num_prompt_tokens"], row["num_cached_tokens"], row["num_completion_tokens"]) == (20, 4, 7)
    assert row["cost_nanodollars"] == 16 * 1000 + 4 * 250 + 7 * 2000
    parsed = list(csv.DictReader(io.StringIO(deepserve("usage", "--csv", url=db_url))))
    assert len(parsed) == 1 and parsed[0]["cost_usd"] == "0.000031" and parsed[0]["model"] == "m"
    assert "0.000031" in deepserve("usage", url=db_url)
    assert json.loads(deepserve("usage", "--json", "--model", "other", url=db_url)) == []
    assert len(json.loads(deepserve("usage", "--json", "--key", str(info.id), url=db_url))) == 1


def test_prices_set_list_unset(db_url):
    set_ = json.loads(deepserve("prices", "set", "my-model", "--input", "0.14", "--output", "0.28", "--json", url=db_url))
    assert (set_["input"], set_["cached_input"], set_["output"]) == (140_000_000, 140_000_000, 280_000_000)
    rows = {r["model"]: r for r in json.loads(deepserve("prices", "list", "--json", url=db_url))}
    assert rows["my-model"]["source"] == "operator" and rows["deepseek-ai/DeepSeek-R1"]["source"] == "catalog"
    math = rows["deepseek-ai/deepseek-math-7b-instruct"]  # Dataoorts' $0.10 / $0.11 per million tokens
    assert (math["source"], math["input"], math["cached_input"], math["output"]) == (
        "catalog", 100_000_000, 100_000_000, 110_000_000)
    # An override by an alias is the model's price (what its requests are charged), listed on its row.
    deepserve("prices", "set", "deepseek-math-7b-instruct", "--input", "0.2", "--output", "0.3", url=db_url)
    rows = {r["model"]: r for r in json.loads(deepserve("prices", "list", "--json", url=db_url))}
    math = rows["deepseek-ai/deepseek-math-7b-instruct"]
    assert (math["source"], math["input"], math["output"]) == ("operator", 200_000_000, 300_000_000)
    assert "deepseek-math-7b-instruct" not in rows
    # Without --cached-input a catalog model keeps its cache discount: deepseek-r1 lists $0.14 of $0.55
    r1 = json.loads(deepserve("prices", "set", "deepseek-r1", "--input", "1.10", "--output", "4.38", "--json", url=db_url))
    assert (r1["input"], r1["cached_input"]) == (1_100_000_000, 280_000_000)
    assert "removed" in deepserve("prices", "unset", "my-model", url=db_url)
