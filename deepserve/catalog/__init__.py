"""The model catalog: what deepserve knows about each model by name (models.toml, shipped in the package).

An entry holds facts, not weights: context window, prices, default sampling, chat template, and where its
GGUF lives on the Hugging Face Hub. Which weights this machine has is the local registry's business
(`deepserve.catalog.registry`); `deepserve.catalog.pull` fetches them.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.templates.chat import BUILTIN_TEMPLATE_NAMES

ARCHITECTURES = ("llama", "qwen2", "deepseek2")
ENGINES = ("llama.cpp", "upstream")
REASONING_FORMATS = ("deepseek", "raw", "hidden")
NANODOLLARS_PER_DOLLAR = 1_000_000_000


class CatalogError(ValueError):
    """The catalog file is malformed: says which entry and which field."""


@dataclass(slots=True, frozen=True)
class Prices:
    """Integer nano-dollars (1e-9 USD) per million tokens."""

    input: int
    cached_input: int
    output: int


@dataclass(slots=True, frozen=True)
class FimTokens:
    """Fill-in-the-middle: prompt = prefix + code before + suffix + code after + middle."""

    prefix: str
    suffix: str
    middle: str


@dataclass(slots=True, frozen=True)
class GgufSource:
    quant: str
    repo: str
    file: str
    revision: str = "main"
    size_bytes: int | None = None
    sha256: str | None = None


@dataclass(slots=True)
class CatalogEntry:
    id: str
    family: str
    architecture: str
    owned_by: str
    num_parameters: int
    context_window: int
    aliases: tuple[str, ...] = ()
    description: str = ""
    engine: str = "llama.cpp"
    bundled: bool = False
    num_active_parameters: int | None = None
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_prompt_chars: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    prices: Prices | None = None
    chat_template: str | None = None
    reasoning: bool = False
    reasoning_format: str | None = None  # deepseek | raw | hidden: how its reasoning is returned by default
    fim: FimTokens | None = None
    gguf: dict[str, GgufSource] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    @property
    def can_run_in_process(self) -> bool:
        """False for models that only an upstream engine (vLLM, SGLang) may serve."""
        return self.engine == "llama.cpp"

    @property
    def can_pull(self) -> bool:
        return self.can_run_in_process and not self.bundled and bool(self.gguf)

    @property
    def default_quant(self) -> str | None:
        if "Q4_K_M" in self.gguf:
            return "Q4_K_M"
        return next(iter(self.gguf), None)

    def source(self, quant: str | None = None) -> GgufSource:
        """The GGUF source of one quantisation (default: Q4_K_M, else the first listed)."""
        quant = quant or self.default_quant
        if quant is None or quant not in self.gguf:
            known = ", ".join(self.gguf) or "none"
            raise KeyError(f"{self.id} has no GGUF quantisation {quant!r}; known: {known}")
        return self.gguf[quant]


class Catalog:
    def __init__(self, entries: list[CatalogEntry]):
        self._entries: dict[str, CatalogEntry] = {}
        self._by_name: dict[str, CatalogEntry] = {}
        for entry in entries:
            for name in entry.names:
                if name in self._by_name:
                    raise CatalogError(f"{name!r} names both {self._by_name[name].id} and {entry.id}")
                self._by_name[name] = entry
            self._entries[entry.id] = entry

    def __iter__(self):
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, name: str) -> CatalogEntry | None:
        """The entry an id or alias names, or None."""
        return self._by_name.get(name)

    def get(self, name: str) -> CatalogEntry:
        entry = self.find(name)
        if entry is None:
            raise KeyError(f"{name!r} is not in the catalog; known ids: {', '.join(self._entries)}")
        return entry


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Parse a catalog TOML file (default: the one shipped in the package)."""
    if path is None:
        text = importlib.resources.files("deepserve.catalog").joinpath("models.toml").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    data = tomllib.loads(text)
    unknown = set(data) - {"models"}
    if unknown:
        raise CatalogError(f"unknown top-level keys in the catalog: {sorted(unknown)}")
    return Catalog([_entry(raw) for raw in data.get("models", [])])


_default: Catalog | None = None


def default_catalog() -> Catalog:
    """The shipped catalog, parsed once per process."""
    global _default
    if _default is None:
        _default = load_catalog()
    return _default


# ---- parsing ---------------------------------------------------------------------------------------------------

_REQUIRED = {"id": str, "family": str, "architecture": str, "owned_by": str, "num_parameters": int,
             "context_window": int}
_OPTIONAL = {"aliases": list, "description": str, "engine": str, "bundled": bool, "num_active_parameters": int,
             "default_max_tokens": int, "max_tokens_limit": int, "max_prompt_chars": int, "chat_template": str,
             "reasoning": bool, "reasoning_format": str, "sampling": dict, "prices": dict, "fim": dict, "gguf": dict}


def _check(where: str, key: str, value: Any, kind: type) -> Any:
    # bool is an int in Python: a price of `true` must not pass as 1 nano-dollar.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CatalogError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def _fields(where: str, raw: dict, required: dict[str, type], optional: dict[str, type]) -> dict[str, Any]:
    unknown = set(raw) - set(required) - set(optional)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
    out = {}
    for key, kind in required.items():
        if key not in raw:
            raise CatalogError(f"{where}: missing {key}")
        out[key] = _check(where, key, raw[key], kind)
    for key, kind in optional.items():
        if key in raw:
            out[key] = _check(where, key, raw[key], kind)
    return out


def _entry(raw: dict) -> CatalogEntry:
    where = f"catalog entry {raw.get('id', '?')!r}"
    f = _fields(where, raw, _REQUIRED, _OPTIONAL)
    if f["architecture"] not in ARCHITECTURES:
        raise CatalogError(f"{where}: architecture must be one of {ARCHITECTURES}")
    if f.get("engine", "llama.cpp") not in ENGINES:
        raise CatalogError(f"{where}: engine must be one of {ENGINES}")
    if f.get("reasoning_format") is not None and f["reasoning_format"] not in REASONING_FORMATS:
        raise CatalogError(f"{where}: reasoning_format must be one of {REASONING_FORMATS}")
    if f.get("chat_template") is not None and f["chat_template"] not in BUILTIN_TEMPLATE_NAMES:
        raise CatalogError(f"{where}: chat_template must be one of {BUILTIN_TEMPLATE_NAMES}")
    for key in ("num_parameters", "context_window", "num_active_parameters", "default_max_tokens",
                "max_tokens_limit", "max_prompt_chars"):
        if key in f and f[key] <= 0:
            raise CatalogError(f"{where}: {key} must be positive")
    sampling = _fields(f"{where} sampling", f.pop("sampling", {}), {}, {"temperature": float, "top_p": float})
    prices = f.pop("prices", None)
    if prices is not None:
        prices = Prices(**_fields(f"{where} prices", prices, {"input": int, "cached_input": int, "output": int}, {}))
        if min(prices.input, prices.cached_input, prices.output) < 0:
            raise CatalogError(f"{where}: prices must not be negative")
    fim = f.pop("fim", None)
    if fim is not None:
        fim = FimTokens(**_fields(f"{where} fim", fim, {"prefix": str, "suffix": str, "middle": str}, {}))
    gguf = {}
    for quant, source in f.pop("gguf", {}).items():
        s = _fields(f"{where} gguf.{quant}", _check(where, f"gguf.{quant}", source, dict),
                    {"repo": str, "file": str}, {"revision": str, "size_bytes": int, "sha256": str})
        sha = s.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise CatalogError(f"{where} gguf.{quant}: sha256 must be 64 lowercase hex digits")
        gguf[quant] = GgufSource(quant=quant, **s)
    aliases = tuple(_check(where, "aliases", a, str) for a in f.pop("aliases", []))
    entry = CatalogEntry(**f, aliases=aliases, prices=prices, fim=fim, gguf=gguf, **sampling)
    if entry.max_tokens_limit and entry.default_max_tokens and entry.default_max_tokens > entry.max_tokens_limit:
        raise CatalogError(f"{where}: default_max_tokens exceeds max_tokens_limit")
    if not entry.can_run_in_process and entry.gguf:
        raise CatalogError(f"{where}: an upstream-only model lists no GGUF weights")
    return entry
