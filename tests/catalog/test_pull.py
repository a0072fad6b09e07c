"""`pull` against a local imitation of the Hub's resolve endpoints (tests/catalog/fake_hub.py): never the internet."""

from __future__ import annotations

import hashlib
import os

import pytest

from deepserve.catalog import default_catalog, load_catalog
from deepserve.catalog.pull import PullError, pull
from deepserve.catalog.registry import LocalRegistry
from tests.catalog.fake_hub import COMMIT, FakeHub

CODER = "deepseek-ai/deepseek-coder-6.7b-instruct"


@pytest.fixture()
def hub():
    running = FakeHub()
    yield running
    running.close()


@pytest.fixture()
def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "data")


def _coder_source(quant=None):
    return default_catalog().get(CODER).source(quant)


def test_pull_downloads_verifies_and_registers(hub, registry):
    content = b"GGUF" + os.urandom(4096)
    source = _coder_source()
    hub.add(source.repo, source.file, content)
    verified = []
    model = pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint, on_verify=verified.append)
    path = registry.models_dir / source.repo / source.file
    assert model.path == str(path) and path.read_bytes() == content
    assert (model.id, model.source, model.quant, model.revision) == (CODER, "pull", "Q4_K_M", COMMIT)
    assert model.sha256 == hashlib.sha256(content).hexdigest() and model.size_bytes == len(content)
    assert registry.get(CODER) == model and verified == [path]
    assert [m for m, _, _ in hub.requests] == ["HEAD", "HEAD", "GET"]


def test_pulling_again_downloads_nothing(hub, registry):
    source = _coder_source("Q8_0")
    hub.add(source.repo, source.file, b"GGUF" + os.urandom(1024))
    entry = default_catalog().get(CODER)
    first = pull(entry, registry, quant="Q8_0", endpoint=hub.endpoint)
    verified = []
    second = pull(entry, registry, quant="Q8_0", endpoint=hub.endpoint, on_verify=verified.append)
    assert second.path == first.path and second.sha256 == first.sha256
    assert len(hub.gets()) == 1 and verified == []


def test_a_dropped_connection_resumes_with_a_range_request(hub, registry, monkeypatch):
    # huggingface_hub hands bytes over in 10 MiB chunks, so break the transfer after the first one.
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    content = b"GGUF" + os.urandom(12 << 20)
    source = _coder_source()
    hub.add(source.repo, source.file, content, drop_after=11 << 20)
    model = pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)
    assert model.sha256 == hashlib.sha256(content).hexdigest()
    ranges = [r for _, _, r in hub.gets()]
    assert ranges == [None, f"bytes={10 << 20}-"]


def test_bytes_that_do_not_match_the_hub_sha256_are_removed_and_not_registered(hub, registry):
    content = b"GGUF" + os.urandom(2048)
    corrupted = content[:-1] + bytes([content[-1] ^ 1])
    source = _coder_source()
    hub.add(source.repo, source.file, content, served=corrupted)
    with pytest.raises(PullError, match="does not match the expected " + hashlib.sha256(content).hexdigest()):
        pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)
    assert not (registry.models_dir / source.repo / source.file).exists()
    assert registry.get(CODER) is None


def test_the_catalog_sha256_wins_over_the_hub(hub, registry, tmp_path):
    content = b"GGUF" + os.urandom(512)
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "t/tiny"\nfamily = "deepseek-llm"\narchitecture = "llama"\nowned_by = "t"\n'
        'num_parameters = 1\ncontext_window = 64\n[models.gguf.Q4_K_M]\nrepo = "t/tiny-GGUF"\nfile = "tiny.gguf"\n'
        f'sha256 = "{"0" * 64}"\nsize_bytes = {len(content)}\n',
        encoding="utf-8",
    )
    hub.add("t/tiny-GGUF", "tiny.gguf", content)
    with pytest.raises(PullError, match="0000000000"):
        pull(load_catalog(path).get("t/tiny"), registry, endpoint=hub.endpoint)


def test_a_file_missing_on_the_hub_is_a_clear_error(hub, registry):
    source = _coder_source()
    hub.add(source.repo, "other.gguf", b"GGUF")
    with pytest.raises(PullError, match=f"could not download {source.repo}/{source.file}"):
        pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)


def test_an_unknown_repository_is_a_clear_error(hub, registry):
    with pytest.raises(PullError, match="the Hub has no repository TheBloke/deepseek-coder-6.7B-instruct-GGUF"):
        pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)


def test_models_without_gguf_weights_are_refused_before_any_request(hub, registry):
    catalog = default_catalog()
    with pytest.raises(PullError, match="upstream engine"):
        pull(catalog.get("deepseek-reasoner"), registry, endpoint=hub.endpoint)
    with pytest.raises(PullError, match="ships with deepserve"):
        pull(catalog.get("SmolLM2-135M-Instruct"), registry, endpoint=hub.endpoint)
    with pytest.raises(PullError, match="no GGUF quantisation 'Q2_K'"):
        pull(catalog.get(CODER), registry, quant="Q2_K", endpoint=hub.endpoint)
    assert hub.requests == []
