"""Which models `deepserve serve` loads, decided before any weights are read.

- `--model-path FILE [--model-id ID]`: that file alone (ID may be a catalog id or alias: it gets the facts).
- `--model ID` (repeatable): those models, from the catalog's bundled entry or the local registry; a model
  whose weights are absent stops the start with the command that fetches them.
- neither: the bundled model plus every registered model whose file is present.
`--template NAME` gives every model of this run that built-in template; else a model keeps the one it was
registered with (`models add --template`), else its GGUF's own, else its catalog family's.

Each model gets its own engine, so the plan also shares the machine out:
- CPU threads: `--threads N` gives every engine N threads (llama-server's meaning: per model). Without it one
  model gets every core this process may use, and several split them evenly (at least one each), so that two
  busy models do not run twice as many compute threads as there are cores.
- CPUs: with `--pin-threads` (default), when the engines' threads use exactly the CPUs this process may run on
  (the default split, or a `taskset`), each engine's threads get CPUs of their own, one each (`LlamaRunner`
  says why); otherwise nothing is pinned.
- context: `--ctx-size` is clamped, per model, to the context window the catalog gives it (the engine also
  clamps to the GGUF's training window, which it reads when it loads the file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from deepserve.bundled import BUNDLED_MODEL_ID, bundled_model_path
from deepserve.catalog import Catalog, CatalogEntry
from deepserve.catalog.registry import LocalRegistry
from deepserve.config import Settings
from deepserve.templates.chat import BUILTIN_TEMPLATE_NAMES

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """A model asked for at start-up cannot be served here; the message says what to run."""


@dataclass(slots=True)
class ModelPlan:
    model_id: str
    path: str
    entry: CatalogEntry | None  # catalog facts, when the catalog knows the model
    template: str | None = None  # built-in template the operator chose; wins over the GGUF's own
    threads: int | None = None  # llama.cpp threads of its engine (None: --threads, else every core)
    ctx_size: int | None = None  # context window of one request on its engine (None: --ctx-size)
    cpus: tuple[int, ...] | None = None  # CPUs its threads are pinned to, one each (None: not pinned)
    cache_ram_mib: int = 0  # its host-memory prompt cache (0: none)


def plan_models(settings: Settings, catalog: Catalog, local: LocalRegistry) -> list[ModelPlan]:
    return assign_resources(_choose_models(settings, catalog, local), settings)


def assign_resources(plans: list[ModelPlan], settings: Settings) -> list[ModelPlan]:
    """Threads and context of each local engine (models served by upstream engines take no core here)."""
    if not plans:
        return plans
    threads = settings.threads or max(1, available_cores() // len(plans))
    cache_ram_mib = settings.cache_ram_mib
    if cache_ram_mib is None:
        cache_ram_mib = default_cache_ram_mib(len(plans))
    for plan, cpus in zip(plans, engine_cpus(threads, len(plans), pin=settings.pin_threads)):
        plan.threads = threads
        plan.cpus = cpus
        plan.cache_ram_mib = cache_ram_mib
        window = plan.entry.context_window if plan.entry is not None else None
        plan.ctx_size = min(settings.ctx_size, window) if window else settings.ctx_size
    return plans


DEFAULT_CACHE_RAM_MIB = 8192  # llama-server's --cache-ram default


def default_cache_ram_mib(num_engines: int, total_mib: int | None = None) -> int:
    """Each engine's host prompt cache: llama-server's 8 GiB, but the engines' caches together at most a quarter
    of the machine's memory. Why: the cache fills with every conversation a slot gives up, up to its bound; on a
    small machine 8 GiB per model (llama-server's choice) would end in the OOM killer, not in a smaller cache."""
    if total_mib is None:
        try:
            total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError, AttributeError):  # not POSIX: keep llama-server's default
            return DEFAULT_CACHE_RAM_MIB
    return max(0, min(DEFAULT_CACHE_RAM_MIB, total_mib // 4 // max(1, num_engines)))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's limit, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def engine_cpus(threads: int, num_engines: int, *, pin: bool = True) -> list[tuple[int, ...] | None]:
    """For each of `num_engines` engines of `threads` threads, the CPUs its threads are pinned to (one each), or
    None. Pinned only when the engines' threads use every CPU this process may run on: then the CPUs are this
    process's to arrange. With fewer threads (an explicit --threads), other work may share the machine (a second
    deepserve, say), and pinning each process to the same first CPUs would pile them up there."""
    cpus = allowed_cpus()
    if not pin or threads * num_engines != len(cpus):
        return [None] * num_engines
    return [tuple(cpus[index * threads:(index + 1) * threads]) for index in range(num_engines)]


def allowed_cpus() -> list[int]:
    """The CPU numbers this process may run on, in order ([] where the OS does not tell: nothing is pinned)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def _choose_models(settings: Settings, catalog: Catalog, local: LocalRegistry) -> list[ModelPlan]:
    if settings.template is not None and settings.template not in BUILTIN_TEMPLATE_NAMES:
        raise ModelUnavailableError(
            f"unknown chat template {settings.template!r}; built-in templates: {', '.join(BUILTIN_TEMPLATE_NAMES)}"
        )
    if settings.model_path:
        model_id = settings.model_id or Path(settings.model_path).name.removesuffix(".gguf")
        entry = catalog.find(model_id)
        if entry is not None and not entry.can_run_in_process:
            raise ModelUnavailableError(_upstream_only(entry))
        return [ModelPlan(model_id, settings.model_path, entry, settings.template)]
    if settings.models:
        plans: dict[str, ModelPlan] = {}
        for name in settings.models:
            plan = _named(name, settings, catalog, local)
            plans.setdefault(plan.model_id, plan)  # an id and its alias name one model
        return list(plans.values())
    plans = [_bundled(settings, catalog, settings.model_id or BUNDLED_MODEL_ID)]
    for model in local.all():
        if not model.is_present:
            log.warning("registered model %s is skipped: its file %s is missing", model.id, model.path)
            continue
        entry = catalog.find(model.id)
        if entry is not None and not entry.can_run_in_process:
            continue
        plans.append(ModelPlan(model.id, model.path, entry, settings.template or model.template))
    return plans


def _bundled(settings: Settings, catalog: Catalog, model_id: str) -> ModelPlan:
    return ModelPlan(model_id, str(bundled_model_path()), catalog.find(BUNDLED_MODEL_ID), settings.template)


def _named(name: str, settings: Settings, catalog: Catalog, local: LocalRegistry) -> ModelPlan:
    entry = catalog.find(name)
    model_id = entry.id if entry is not None else name
    if entry is not None and entry.bundled:
        return _bundled(settings, catalog, entry.id)
    if entry is not None and not entry.can_run_in_process:
        raise ModelUnavailableError(_upstream_only(entry))
    model = local.get(model_id)
    if model is None or not model.is_present:
        if entry is not None:
            raise ModelUnavailableError(
                f"the weights of {entry.id} are not on this machine: fetch them with "
                f"`deepserve models pull {entry.id}` (or register a local file with "
                f"`deepserve models add {entry.id} --gguf PATH`)."
            )
        if model is not None:
            raise ModelUnavailableError(f"{model_id} is registered, but its file {model.path} is missing.")
        raise ModelUnavailableError(
            f"unknown model {name!r}: it is neither in the catalog (`deepserve models list`) nor registered "
            f"(`deepserve models add {name} --gguf PATH`)."
        )
    return ModelPlan(model_id, model.path, entry, settings.template or model.template)


def _upstream_only(entry: CatalogEntry) -> str:
    return (f"{entry.id} is served only by an upstream engine (vLLM or SGLang on GPUs), never by the in-process "
            "llama.cpp engine; serve other weights under a name of your own.")
