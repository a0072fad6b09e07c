"""deepserve.fim with a stand-in engine (no llama.cpp): where the FIM tokens come from, and the prompt's layout.
The real engine and HTTP are in tests/api/openai/test_fim.py."""

from __future__ import annotations

import pytest

from deepserve.catalog import default_catalog
from deepserve.errors import InvalidRequestError
from deepserve.fim import fim_prompt_tokens, fim_token_ids, wants_fim
from deepserve.serving import ServedModel
from deepserve.templates.chat import CHATML_TEMPLATE, ChatTemplate

SPECIAL = {"<s>": 1, "<｜fim▁begin｜>": 10, "<｜fim▁hole｜>": 11, "<｜fim▁end｜>": 12}


class _Engine:
    """Tokenizes one character per token (its code point + 100); knows DeepSeek's FIM strings as specials."""

    ctx_size = 1024

    def __init__(self, adds_bos: bool = True):
        self.adds_bos = adds_bos

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out = [1] if add_special and self.adds_bos else []
        while text:
            special = next((s for s in SPECIAL if parse_special and text.startswith(s)), None)
            if special:
                out.append(SPECIAL[special])
                text = text[len(special):]
            else:
                out.append(ord(text[0]) + 100)
                text = text[1:]
        return out


class _EngineWithIds(_Engine):
    def fim_token_ids(self):
        return (20, 21, 22)


def served(engine, catalog_name: str | None = None) -> ServedModel:
    entry = default_catalog().get(catalog_name) if catalog_name else None
    return ServedModel(model_id="m", engine=engine, template=ChatTemplate(CHATML_TEMPLATE), catalog=entry)


def test_the_engines_ids_come_first():
    model = served(_EngineWithIds(), "deepseek-coder-6.7b-instruct")
    assert fim_token_ids(model) == (20, 21, 22)
    assert fim_prompt_tokens(model, "ab", "c") == [1, 20, 197, 198, 21, 199, 22]


def test_an_engine_that_cannot_say_falls_back_to_the_catalogs_strings():
    assert fim_token_ids(served(_Engine(), "deepseek-coder-6.7b-instruct")) == (10, 11, 12)
    assert fim_token_ids(served(_Engine(), "deepseek-math-7b-instruct")) is None  # no [models.fim]
    assert fim_token_ids(served(_Engine())) is None


def test_no_bos_for_a_model_that_adds_none_and_token_prefixes_are_kept_as_given():
    model = served(_EngineWithIds(adds_bos=False))
    assert fim_prompt_tokens(model, [5, 6], "") == [20, 5, 6, 21, 22]


def test_without_fim_tokens_a_suffix_is_refused_and_an_empty_one_is_a_plain_completion():
    model = served(_Engine())
    with pytest.raises(InvalidRequestError, match="does not support fill-in-the-middle") as info:
        fim_prompt_tokens(model, "a", "b")
    assert info.value.param == "suffix"
    assert (wants_fim(model, None), wants_fim(model, ""), wants_fim(model, "b")) == (False, False, True)
    fim = served(_EngineWithIds())
    assert (wants_fim(fim, None), wants_fim(fim, ""), wants_fim(fim, "b")) == (False, True, True)
