"""Chat templates: the Jinja template embedded in the GGUF, or a built-in one, rendered in a sandbox.

Templates are written for Hugging Face's `apply_chat_template`, so we offer the same environment:
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, loop controls, and
trim_blocks/lstrip_blocks.

Built-in templates (`builtin/<name>.jinja`) cover the DeepSeek families for GGUF files that carry no
template of their own, or when the operator names one (`--template NAME`).
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deepserve.errors import InvalidRequestError

BUILTIN_TEMPLATE_NAMES = ("chatml", "deepseek-coder", "deepseek-llm", "deepseek-r1")


@functools.cache
def builtin_template(name: str) -> str:
    """The source of a built-in template; ValueError names the ones that exist."""
    if name not in BUILTIN_TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {name!r}; built-in templates: {', '.join(BUILTIN_TEMPLATE_NAMES)}")
    return importlib.resources.files("deepserve.templates").joinpath("builtin", f"{name}.jinja").read_text("utf-8")


# The last resort when neither the GGUF, the catalog nor the operator names a template.
CHATML_TEMPLATE = builtin_template("chatml")


def choose_template_source(*, operator: str | None, gguf: str | None, catalog: str | None) -> str:
    """The template a model is served with: the one the operator names (`--template`, `models add --template`),
    else the GGUF's own, else the catalog's built-in one for its family, else ChatML."""
    if operator:
        return builtin_template(operator)
    if gguf:
        return gguf
    if catalog:
        return builtin_template(catalog)
    return CHATML_TEMPLATE


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                **extra,
            )
        except jinja2.exceptions.TemplateError as exc:
            # Templates reject conversations they cannot express (e.g. roles out of order).
            raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from exc
