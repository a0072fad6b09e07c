"""The models file (`deepserve serve --config`): remote and local entries, and the errors a typo gets."""

from __future__ import annotations

import json

import pytest

from deepserve.catalog import default_catalog
from deepserve.catalog.plan import ModelUnavailableError
from deepserve.catalog.registry import LocalRegistry
from deepserve.config import Settings
from deepserve.models_file import load_models_file

SECRET = "sk-upstream-do-not-print"


def load(tmp_path, models: list[dict]):
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps({"models": models}))
    return load_models_file(path, Settings(), default_catalog(), LocalRegistry(tmp_path))


def test_remote_and_local_models_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("R1_KEY", SECRET)
    loaded = load(tmp_path, [
        {"id": "deepseek-r1", "upstream_model": "deepseek-ai/DeepSeek-R1",
         "upstreams": [{"url": "http://10.0.0.10:8000/v1/", "api_key_env": "R1_KEY"},
                       {"url": "https://r1.internal/v1", "api_key": "k2", "name": "second"}],
         "timeouts": {"read_s": 900}},
        {"id": "SmolLM2-135M-Instruct"},
    ])
    (remote,) = loaded.remote
    assert remote.context_window == 131072  # the catalog's, for an alias of DeepSeek-R1
    a, b = remote.upstreams
    assert (a.url, a.name, a.health_url) == ("http://10.0.0.10:8000/v1", "10.0.0.10:8000", "http://10.0.0.10:8000/health")
    assert a.headers() == {"Authorization": f"Bearer {SECRET}"} and b.name == "second"
    assert remote.timeouts.read_s == 900 and remote.timeouts.connect_s == 5
    assert SECRET not in repr(remote) and SECRET not in str(remote.model_dump())
    (local,) = loaded.local
    assert local.model_id == "SmolLM2-135M-Instruct" and local.path.endswith(".gguf")


@pytest.mark.parametrize(("models", "expected"), [
    ([{"id": "mine", "upstreams": [{"url": "http://h:1/v1"}]}], "context_window` is required"),
    ([{"id": "x", "context_window": 99, "upstreams": [{"url": "http://h:1/v1", "api_ky": "a"}]}],
     "upstreams.0.api_ky: Extra inputs are not permitted"),
    ([{"id": "x", "context_window": 99, "upstreams": []}], "upstreams"),
    ([{"id": "x", "context_window": 99, "upstreams": [{"url": "ftp://h/v1"}]}], "must be http(s)"),
    ([{"id": "x", "context_window": 99, "upstreams": [{"url": f"http://u:{SECRET}@h/v1"}]}], "credentials"),
    ([{"id": "x", "context_window": 99, "upstreams": [{"url": "http://h:1/v1", "api_key_env": "NOT_SET_ANYWHERE"}]}],
     "NOT_SET_ANYWHERE"),
    ([{"id": "x", "context_window": 99, "upstreams": [{"url": "http://h:1/v1"}, {"url": "http://h:1/v1"}]}],
     "give them `name`s"),
    ([{"id": "deepseek-r1"}], "served only by upstream engines"),
    ([{"id": "mine", "gguf": "/no/such.gguf"}], "does not exist"),
    ([{"id": "SmolLM2-135M-Instruct"}, {"id": "SmolLM2-135M-Instruct"}], "listed twice"),
])
def test_mistakes_stop_the_start_naming_the_entry_and_field(tmp_path, models, expected):
    with pytest.raises(ModelUnavailableError) as caught:
        load(tmp_path, models)
    assert expected in str(caught.value) and "models[" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_file_without_models_is_refused(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: []\n")
    with pytest.raises(ModelUnavailableError, match="at least one model"):
        load_models_file(path, Settings(), default_catalog(), LocalRegistry(tmp_path))
    with pytest.raises(ModelUnavailableError, match="cannot read"):
        load_models_file(tmp_path / "absent.yaml", Settings(), default_catalog(), LocalRegistry(tmp_path))


def test_serve_refuses_a_bad_models_file_or_one_mixed_with_model_flags(tmp_path):
    from typer.testing import CliRunner

    from deepserve.cli import app

    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - id: nope\n    upstreams: [{url: 'ftp://x/v1'}]\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and "models[0] (nope)" in result.output and "must be http(s)" in result.output
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--model", "SmolLM2-135M-Instruct"])
    assert result.exit_code == 2 and "not both" in result.output


def test_local_models_of_a_models_file_split_the_cores_and_remote_ones_take_none(tmp_path, monkeypatch):
    from deepserve.catalog.plan import assign_resources

    monkeypatch.setattr("deepserve.catalog.plan.available_cores", lambda: 8)
    loaded = load(tmp_path, [
        {"id": "deepseek-r1", "upstreams": [{"url": "http://10.0.0.10:8000/v1"}]},
        {"id": "SmolLM2-135M-Instruct"},
        {"id": "smol-copy", "gguf": loaded_gguf_path()},
    ])
    plans = assign_resources(loaded.local, Settings())
    assert [p.threads for p in plans] == [4, 4]  # two local engines share 8 cores; the upstream model takes none
    assert [p.ctx_size for p in plans] == [Settings().ctx_size] * 2


def loaded_gguf_path() -> str:
    from deepserve.bundled import bundled_model_path

    return str(bundled_model_path())
