"""The models file: `deepserve serve --config models.yaml` serves exactly the models it lists.

```yaml
models:
  - id: deepseek-r1                      # served by upstream engines: it has `upstreams`
    upstream_model: deepseek-ai/DeepSeek-R1
    upstreams:
      - url: http://10.0.0.5:8000/v1
        api_key_env: VLLM_API_KEY        # or api_key: ...; never logged
      - url: http://10.0.0.6:8000/v1
    timeouts: {connect_s: 5, read_s: 600}
  - id: SmolLM2-135M-Instruct            # in-process llama.cpp: a catalog, bundled or registered id
  - id: my-coder                         # or a GGUF file of your own
    gguf: /models/coder.Q5_K_M.gguf
    template: deepseek-coder
```

A remote model's id may be a catalog id or alias (deepseek-r1): it then gets the catalog's facts (context
window, prices, default sampling, reasoning). See deepserve/engine/remote/config.py for every remote field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deepserve.catalog import Catalog
from deepserve.catalog.plan import ModelPlan, ModelUnavailableError, _bundled, _named
from deepserve.catalog.registry import LocalRegistry
from deepserve.config import Settings
from deepserve.engine.remote.config import RemoteModelSpec
from deepserve.templates.chat import BUILTIN_TEMPLATE_NAMES


class LocalModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    gguf: str | None = Field(None, description="GGUF file (default: the catalog's bundled or registered weights)")
    template: str | None = Field(None, description="built-in chat template (default: the GGUF's own)")


@dataclass(slots=True)
class ModelsFile:
    local: list[ModelPlan]
    remote: list[RemoteModelSpec]


def load_models_file(path: str | Path, settings: Settings, catalog: Catalog, local: LocalRegistry) -> ModelsFile:
    """Parse and check the file; every problem raises ModelUnavailableError naming the entry and field."""
    try:
        data = yaml.safe_load(Path(path).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelUnavailableError(f"cannot read the models file {path}: {exc}") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ModelUnavailableError(f"{path}: expected a top-level `models:` list with at least one model")
    result = ModelsFile([], [])
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: models[{i}]" + (f" ({entry['id']})" if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            raise ModelUnavailableError(f"{where}: expected a mapping with at least `id`")
        try:
            if "upstreams" in entry:
                spec = RemoteModelSpec.model_validate(entry)
                catalog_entry = catalog.find(spec.id)
                if spec.context_window is None:
                    if catalog_entry is None:
                        raise ModelUnavailableError(
                            f"{where}: `context_window` is required for a model the catalog does not know")
                    spec.context_window = catalog_entry.context_window
                model_id = catalog_entry.id if catalog_entry is not None else spec.id
                result.remote.append(spec)
            else:
                plan = _local_plan(LocalModelSpec.model_validate(entry), settings, catalog, local)
                model_id = plan.model_id
                result.local.append(plan)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise ModelUnavailableError(f"{where}: {problems}") from None  # errors() carry no input values
        except ModelUnavailableError as exc:
            raise ModelUnavailableError(str(exc) if str(exc).startswith(str(path)) else f"{where}: {exc}") from None
        if model_id in seen:
            raise ModelUnavailableError(f"{where}: the model {model_id} is listed twice")
        seen.add(model_id)
    return result


def _local_plan(spec: LocalModelSpec, settings: Settings, catalog: Catalog, local: LocalRegistry) -> ModelPlan:
    if spec.template is not None and spec.template not in BUILTIN_TEMPLATE_NAMES:
        raise ModelUnavailableError(
            f"unknown chat template {spec.template!r}; built-in templates: {', '.join(BUILTIN_TEMPLATE_NAMES)}")
    entry = catalog.find(spec.id)
    if spec.gguf is not None:
        if not Path(spec.gguf).expanduser().is_file():
            raise ModelUnavailableError(f"the GGUF file {spec.gguf} does not exist")
        if entry is not None and not entry.can_run_in_process:
            raise ModelUnavailableError(f"{entry.id} is served only by upstream engines: give it `upstreams`")
        return ModelPlan(spec.id, str(Path(spec.gguf).expanduser()), entry, spec.template)
    if entry is not None and not entry.can_run_in_process:
        raise ModelUnavailableError(f"{entry.id} is served only by upstream engines: give it `upstreams`")
    plan = _bundled(settings, catalog, entry.id) if entry is not None and entry.bundled else _named(
        spec.id, settings, catalog, local)
    if spec.template is not None:
        plan.template = spec.template
    return plan
