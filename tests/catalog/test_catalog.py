"""The shipped catalog carries the seeds' facts, and the loader refuses malformed entries."""

from __future__ import annotations

import pytest

from deepserve.catalog import CatalogError, Prices, default_catalog, load_catalog
from deepserve.templates.chat import BUILTIN_TEMPLATE_NAMES


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


def test_math_instruct_has_dataoorts_window_and_prices(catalog):
    e = catalog.get("deepseek-ai/deepseek-math-7b-instruct")
    assert e.context_window == 4096 and e.architecture == "llama" and e.chat_template == "deepseek-llm"
    assert e.prices == Prices(input=100_000_000, cached_input=100_000_000, output=110_000_000)  # $0.10 / $0.11


def test_math_base_has_workers_ai_defaults_under_its_cf_name(catalog):
    e = catalog.get("@cf/deepseek-ai/deepseek-math-7b-base")
    assert e.id == "deepseek-ai/deepseek-math-7b-base"
    assert e.default_max_tokens == 256 and e.max_prompt_chars == 4096


def test_r1_is_an_upstream_only_moe(catalog):
    e = catalog.get("deepseek-reasoner")
    assert e is catalog.get("deepseek-ai/DeepSeek-R1")
    assert (e.architecture, e.num_parameters, e.num_active_parameters) == ("deepseek2", 671 * 10**9, 37 * 10**9)
    assert e.context_window == 128 * 1024 and e.reasoning and e.chat_template == "deepseek-r1"
    assert e.engine == "upstream" and not e.can_run_in_process and not e.can_pull and e.gguf == {}


def test_coder_has_a_16k_window_and_fim_tokens(catalog):
    e = catalog.get("deepseek-ai/deepseek-coder-6.7b-instruct")
    assert e.context_window == 16384 and e.chat_template == "deepseek-coder"
    assert (e.fim.prefix, e.fim.suffix, e.fim.middle) == ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
    assert e.source().repo == "TheBloke/deepseek-coder-6.7B-instruct-GGUF"
    assert e.source().file == "deepseek-coder-6.7b-instruct.Q4_K_M.gguf"
    assert e.source("Q8_0").file == "deepseek-coder-6.7b-instruct.Q8_0.gguf"


def test_r1_32b_has_deeprequest_defaults(catalog):
    e = catalog.get("deepseek-r1-32b")
    assert e.id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" and e.architecture == "qwen2"
    assert e.context_window == 131072
    assert (e.default_max_tokens, e.max_tokens_limit) == (100, 32768)
    assert (e.temperature, e.top_p) == (0.6, 0.95)
    assert e.reasoning and e.default_quant == "Q4_K_M"


def test_bundled_smollm2_is_never_presented_as_deepseek(catalog):
    e = catalog.get("SmolLM2-135M-Instruct")
    assert e.family == "smollm2" and e.owned_by == "HuggingFaceTB" and e.bundled
    assert "deepseek" not in e.id.lower() and not any("deepseek" in a.lower() for a in e.aliases)
    assert not e.can_pull


def test_every_entry_is_consistent(catalog):
    assert len(catalog) >= 6
    for e in catalog:
        assert e.chat_template in BUILTIN_TEMPLATE_NAMES
        if e.prices is not None:  # money is integers
            assert all(type(v) is int for v in (e.prices.input, e.prices.cached_input, e.prices.output))
        if e.can_run_in_process and not e.bundled:
            assert {"Q4_K_M", "Q8_0"} <= set(e.gguf), e.id
            for quant, source in e.gguf.items():
                assert source.file.endswith(".gguf") and quant in source.file
        if e.owned_by == "deepseek-ai":
            assert e.family.startswith("deepseek")


def test_unknown_quant_names_the_known_ones(catalog):
    with pytest.raises(KeyError, match="Q4_K_M, Q8_0"):
        catalog.get("deepseek-coder-6.7b-instruct").source("Q2_K")


def _write(tmp_path, body: str):
    path = tmp_path / "models.toml"
    path.write_text(body, encoding="utf-8")
    return path


_MINIMAL = '''
[[models]]
id = "x/y"
family = "deepseek-llm"
architecture = "llama"
owned_by = "x"
num_parameters = 1
context_window = 64
'''


def test_a_float_price_is_refused(tmp_path):
    with pytest.raises(CatalogError, match="input must be int"):
        load_catalog(_write(tmp_path, _MINIMAL + "[models.prices]\ninput = 0.1\ncached_input = 1\noutput = 1\n"))


def test_unknown_keys_and_architectures_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="unknown keys"):
        load_catalog(_write(tmp_path, _MINIMAL + "contxt_window = 5\n"))
    with pytest.raises(CatalogError, match="architecture"):
        load_catalog(_write(tmp_path, _MINIMAL.replace('"llama"', '"mamba"')))


def test_an_alias_may_name_only_one_model(tmp_path):
    second = _MINIMAL.replace('"x/y"', '"x/z"') + 'aliases = ["x/y"]\n'
    with pytest.raises(CatalogError, match="names both"):
        load_catalog(_write(tmp_path, _MINIMAL + second))


def test_upstream_models_list_no_gguf(tmp_path):
    body = _MINIMAL + 'engine = "upstream"\n[models.gguf.Q4_K_M]\nrepo = "a/b"\nfile = "c.gguf"\n'
    with pytest.raises(CatalogError, match="upstream-only"):
        load_catalog(_write(tmp_path, body))
