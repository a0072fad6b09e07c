"""`pull` against a local imitation of the Hub's resolve endpoints (tests/catalog/fake_hub.py): never the internet."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from deepserve.catalog import default_catalog, load_catalog
from deepserve.catalog.pull import PullError, pull, remove
from deepserve.catalog.registry import LocalModel, LocalRegistry
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


def _tiny_catalog(tmp_path, *, sha256: str, size_bytes: int):
    """A catalog of one model whose GGUF source states its size and sha256, as an entry may."""
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "t/tiny"\nfamily = "deepseek-llm"\narchitecture = "llama"\nowned_by = "t"\n'
        'num_parameters = 1\ncontext_window = 64\n[models.gguf.Q4_K_M]\nrepo = "t/tiny-GGUF"\nfile = "tiny.gguf"\n'
        f'sha256 = "{sha256}"\nsize_bytes = {size_bytes}\n',
        encoding="utf-8",
    )
    return load_catalog(path).get("t/tiny")


def test_the_catalog_sha256_wins_over_the_hub(hub, registry, tmp_path):
    content = b"GGUF" + os.urandom(512)
    hub.add("t/tiny-GGUF", "tiny.gguf", content)
    with pytest.raises(PullError, match="0000000000"):
        pull(_tiny_catalog(tmp_path, sha256="0" * 64, size_bytes=len(content)), registry, endpoint=hub.endpoint)
    assert registry.get("t/tiny") is None
    assert not (registry.models_dir / "t/tiny-GGUF/tiny.gguf").exists()


def test_a_file_matching_the_catalog_size_and_sha256_is_registered(hub, registry, tmp_path):
    content = b"GGUF" + os.urandom(512)
    digest = hashlib.sha256(content).hexdigest()
    hub.add("t/tiny-GGUF", "tiny.gguf", content)
    model = pull(_tiny_catalog(tmp_path, sha256=digest, size_bytes=len(content)), registry, endpoint=hub.endpoint)
    assert (model.sha256, model.size_bytes) == (digest, len(content)) and registry.get("t/tiny") == model


def test_a_size_the_catalog_does_not_expect_is_refused_before_downloading(hub, registry, tmp_path):
    content = b"GGUF" + os.urandom(512)
    hub.add("t/tiny-GGUF", "tiny.gguf", content)
    entry = _tiny_catalog(tmp_path, sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content) + 1)
    expected = f"is {len(content)} bytes on the Hub but the catalog expects {len(content) + 1}"
    with pytest.raises(PullError, match=expected):
        pull(entry, registry, endpoint=hub.endpoint)
    assert hub.gets() == [] and registry.get("t/tiny") is None


def test_a_file_that_is_not_gguf_is_removed_and_not_registered(hub, registry):
    source = _coder_source()
    hub.add(source.repo, source.file, b"<html>rate limited</html>")  # the Hub's sha256 of what it serves matches
    with pytest.raises(PullError, match="is not a GGUF file"):
        pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)
    assert registry.get(CODER) is None and not (registry.models_dir / source.repo / source.file).exists()


# ---- remove ------------------------------------------------------------------------------------------------------

def test_remove_with_delete_files_deletes_the_download_and_its_hub_bookkeeping(hub, registry):
    source = _coder_source()
    hub.add(source.repo, source.file, b"GGUF" + os.urandom(256))
    model = pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)
    repo_dir = registry.models_dir / source.repo
    assert (repo_dir / ".cache/huggingface/download" / f"{source.file}.metadata").is_file()
    removed, deleted = remove(registry, default_catalog(), "deepseek-coder-6.7b-instruct", delete_files=True)  # alias
    assert removed == model and registry.get(CODER) is None
    assert Path(model.path) in deleted and not Path(model.path).exists()
    assert not repo_dir.exists() and not repo_dir.parent.exists()  # TheBloke/ was only this download
    assert registry.models_dir.is_dir()


def test_remove_without_delete_files_keeps_the_file(hub, registry):
    source = _coder_source()
    hub.add(source.repo, source.file, b"GGUF" + os.urandom(256))
    model = pull(default_catalog().get(CODER), registry, endpoint=hub.endpoint)
    assert remove(registry, default_catalog(), CODER) == (model, [])
    assert Path(model.path).is_file() and registry.get(CODER) is None


def test_remove_keeps_other_downloads_of_the_same_repository(hub, registry):
    entry = default_catalog().get(CODER)
    for quant in ("Q4_K_M", "Q8_0"):
        hub.add(entry.source(quant).repo, entry.source(quant).file, b"GGUF" + os.urandom(256))
    q4 = pull(entry, registry, quant="Q4_K_M", endpoint=hub.endpoint)
    q8 = pull(entry, registry, quant="Q8_0", endpoint=hub.endpoint)  # replaces the registration, not the file
    _, deleted = remove(registry, default_catalog(), CODER, delete_files=True)
    assert Path(q8.path) in deleted and not Path(q8.path).exists()
    repo_dir = registry.models_dir / entry.source().repo
    assert Path(q4.path).is_file()
    assert (repo_dir / ".cache/huggingface/download" / f"{Path(q4.path).name}.metadata").is_file()


def test_remove_never_deletes_a_file_registered_with_add(registry, tmp_path):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF")
    registry.add(LocalModel(id="mine", path=str(mine), source="add"))
    # even a file that happens to lie under the models folder: `add` registered it, the operator owns it
    inside = registry.models_dir / "x" / "y.gguf"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"GGUF")
    registry.add(LocalModel(id="inside", path=str(inside), source="add"))
    assert remove(registry, default_catalog(), "mine", delete_files=True)[1] == []
    assert remove(registry, default_catalog(), "inside", delete_files=True)[1] == []
    assert mine.is_file() and inside.is_file() and registry.all() == []


def test_remove_refuses_what_is_not_registered(registry):
    with pytest.raises(PullError, match="'deepseek-r1-32b' is not registered"):
        remove(registry, default_catalog(), "deepseek-r1-32b")
    with pytest.raises(PullError, match="ships with deepserve"):
        remove(registry, default_catalog(), "SmolLM2-135M-Instruct")


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


def test_an_unreachable_hub_is_one_clear_error_not_a_traceback(registry):
    import socket
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(PullError, match="could not download"):
        pull(default_catalog().get(CODER), registry, endpoint=closed)
    assert registry.get(CODER) is None
