"""The local model registry: which weights this machine has, as JSON under the data directory.

`<data_dir>/models.json` maps model ids to GGUF files, written by `deepserve models pull` (downloads into
`<data_dir>/models/<repo>/`) and `deepserve models add` (any local file, left where it is). Writes hold an
exclusive lock and replace the file atomically, so two commands never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_FORMAT_VERSION = 1


@dataclass(slots=True)
class LocalModel:
    id: str
    path: str  # absolute path of the GGUF file
    source: str  # "pull" (from the Hub) or "add" (registered by hand)
    template: str | None = None  # built-in template name the operator chose (models add --template)
    repo: str | None = None
    file: str | None = None
    quant: str | None = None
    revision: str | None = None  # the Hub commit the file came from
    size_bytes: int | None = None
    sha256: str | None = None
    added_at: int = 0

    @property
    def is_present(self) -> bool:
        return Path(self.path).is_file()


class LocalRegistry:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).expanduser()

    @property
    def path(self) -> Path:
        return self.data_dir / "models.json"

    @property
    def models_dir(self) -> Path:
        """Where pulled weights go: one folder per Hub repository."""
        return self.data_dir / "models"

    def all(self) -> list[LocalModel]:
        return list(self._read().values())

    def get(self, model_id: str) -> LocalModel | None:
        return self._read().get(model_id)

    def add(self, model: LocalModel) -> LocalModel:
        """Register (or replace) a model under its id."""
        if not model.added_at:
            model.added_at = int(time.time())
        with self._locked():
            models = self._read()
            models[model.id] = model
            self._write(models)
        return model

    def remove(self, model_id: str) -> bool:
        with self._locked():
            models = self._read()
            found = models.pop(model_id, None) is not None
            if found:
                self._write(models)
        return found

    # ---- storage -----------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, LocalModel]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"the model registry {self.path} is not valid JSON ({exc}); fix or remove it") from exc
        names = {f.name for f in dataclasses.fields(LocalModel)}
        return {m["id"]: LocalModel(**{k: v for k, v in m.items() if k in names}) for m in data.get("models", [])}

    def _write(self, models: dict[str, LocalModel]) -> None:
        body = {"version": _FORMAT_VERSION, "models": [dataclasses.asdict(m) for m in models.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".models-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=2, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".models.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
