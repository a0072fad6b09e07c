"""The local registry (models.json) and `add`, which registers local weights."""

from __future__ import annotations

import json

import pytest

from deepserve.catalog import default_catalog
from deepserve.catalog.pull import PullError, add
from deepserve.catalog.registry import LocalModel, LocalRegistry


@pytest.fixture()
def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "data")


@pytest.fixture()
def gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_empty_registry_reads_as_empty(registry):
    assert registry.all() == [] and registry.get("x") is None
    assert not registry.path.exists()


def test_add_get_replace_remove_round_trip(registry, gguf_file):
    registry.add(LocalModel(id="a", path=str(gguf_file), source="add"))
    registry.add(LocalModel(id="b", path="/nowhere.gguf", source="add", template="chatml"))
    registry.add(LocalModel(id="a", path=str(gguf_file), source="add", template="deepseek-r1"))
    assert [m.id for m in registry.all()] == ["a", "b"]
    a = registry.get("a")
    assert a.template == "deepseek-r1" and a.is_present and a.added_at > 0
    assert not registry.get("b").is_present
    body = json.loads(registry.path.read_text())
    assert body["version"] == 1 and [m["id"] for m in body["models"]] == ["a", "b"]
    assert registry.remove("b") and not registry.remove("b")
    assert [m.id for m in LocalRegistry(registry.data_dir).all()] == ["a"]


def test_a_corrupt_registry_file_says_where_it_is(registry):
    registry.data_dir.mkdir(parents=True)
    registry.path.write_text("{not json")
    with pytest.raises(RuntimeError, match="models.json"):
        registry.all()


def test_add_registers_an_alias_under_the_canonical_id(registry, gguf_file):
    model = add(registry, default_catalog(), "deepseek-r1-32b", gguf_file, template="deepseek-r1")
    assert model.id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert registry.get(model.id).path == str(gguf_file.resolve())
    assert model.source == "add" and model.template == "deepseek-r1" and model.size_bytes == 64


def test_add_takes_any_new_name(registry, gguf_file):
    assert add(registry, default_catalog(), "my-finetune", gguf_file).id == "my-finetune"


def test_add_refuses_what_it_cannot_serve(registry, gguf_file, tmp_path):
    catalog = default_catalog()
    with pytest.raises(PullError, match="does not exist"):
        add(registry, catalog, "x", tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\3\4")
    with pytest.raises(PullError, match="not a GGUF"):
        add(registry, catalog, "x", not_gguf)
    with pytest.raises(PullError, match="upstream engine"):
        add(registry, catalog, "deepseek-reasoner", gguf_file)
    with pytest.raises(PullError, match="built-in templates: chatml"):
        add(registry, catalog, "x", gguf_file, template="alpaca")
    assert registry.all() == []
