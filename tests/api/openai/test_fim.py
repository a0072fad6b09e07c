"""Fill-in-the-middle through `POST /v1/completions` (`prompt` + `suffix`), with the openai SDK over real HTTP.

The server runs in this process (uvicorn on 127.0.0.1) so that the test can see the exact prompt tokens the
real engine is given: the tiny deepseek-coder GGUF (tests/tiny_gguf.py) carries DeepSeek's FIM tokens, the
tiny deepseek-math one does not. The bundled SmolLM2 (its own server, tests/conftest.py) has none either.
"""

from __future__ import annotations

import openai
import pytest

from deepserve.config import Settings
from tests.api.inprocess import serve_in_process

CODER = "deepseek-ai/deepseek-coder-6.7b-instruct"
NO_FIM = "tiny-math"
KEY = "sk-fim-test"
PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_server(tiny_ggufs, tmp_path_factory):
    settings = Settings(api_keys=[KEY], parallel=2, ctx_size=256, threads=1,
                        data_dir=tmp_path_factory.mktemp("fim-data"))
    with serve_in_process(settings, [(CODER, tiny_ggufs["deepseek-coder"]),
                                     (NO_FIM, tiny_ggufs["deepseek-math"])]) as (url, engines):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120), engines


def deepseek_fim_tokens(engine, prefix: str, suffix: str) -> list[int]:
    """DeepSeek-Coder's documented FIM prompt, written out as text with its special tokens."""
    text = f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"
    return engine.tokenize(text, add_special=False, parse_special=True)


def test_suffix_builds_deepseeks_fim_prompt_and_returns_the_middle(fim_server):
    client, engines = fim_server
    coder = engines[CODER]
    expected = deepseek_fim_tokens(coder, PREFIX, SUFFIX)
    assert len(coder.tokenize("<｜fim▁begin｜><｜fim▁hole｜><｜fim▁end｜>", add_special=False, parse_special=True)) == 3
    r = client.completions.create(model=CODER, prompt=PREFIX, suffix=SUFFIX, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert coder.prompts[-1] == expected
    assert r.usage.prompt_tokens == len(expected) and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    # The text is the middle alone: what the model writes after that exact prompt, nothing echoed around it.
    plain = client.completions.create(model=CODER, prompt=expected, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].text == plain.choices[0].text and PREFIX not in r.choices[0].text


def test_streamed_fim_gives_the_same_middle(fim_server):
    client, engines = fim_server
    args = dict(model=CODER, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert engines[CODER].prompts[-1] == engines[CODER].prompts[-2] == deepseek_fim_tokens(engines[CODER], PREFIX,
                                                                                          SUFFIX)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_fim_markers_written_in_the_code_stay_text(fim_server):
    client, engines = fim_server
    coder = engines[CODER]
    sneaky = 'marker = "<｜fim▁hole｜>"\n'
    client.completions.create(model=CODER, prompt=sneaky, suffix=SUFFIX, max_tokens=1)
    [hole] = coder.tokenize("<｜fim▁hole｜>", add_special=False, parse_special=True)
    prompt = coder.prompts[-1]
    assert prompt.count(hole) == 1  # the real one, between prefix and suffix
    assert prompt[2:prompt.index(hole)] == coder.tokenize(sneaky, add_special=False, parse_special=False)


def test_each_prompt_of_a_list_gets_its_own_fim_prompt(fim_server):
    client, engines = fim_server
    coder = engines[CODER]
    before = len(coder.prompts)
    token_prefix = coder.tokenize("x = ", add_special=False, parse_special=False)
    r = client.completions.create(model=CODER, prompt=[PREFIX, "y = "], suffix=SUFFIX, max_tokens=2)
    assert len(r.choices) == 2
    assert sorted(coder.prompts[before:]) == sorted(
        [deepseek_fim_tokens(coder, PREFIX, SUFFIX), deepseek_fim_tokens(coder, "y = ", SUFFIX)])
    client.completions.create(model=CODER, prompt=token_prefix, suffix=SUFFIX, max_tokens=1)
    assert coder.prompts[-1] == deepseek_fim_tokens(coder, "x = ", SUFFIX)  # token ids are the prefix as given


def test_an_empty_suffix_is_fim_on_a_fim_model(fim_server):
    client, engines = fim_server
    client.completions.create(model=CODER, prompt=PREFIX, suffix="", max_tokens=1)
    assert engines[CODER].prompts[-1] == deepseek_fim_tokens(engines[CODER], PREFIX, "")


def test_echo_with_suffix_is_refused(fim_server):
    client, engines = fim_server
    before = len(engines[CODER].prompts)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CODER, prompt=PREFIX, suffix=SUFFIX, echo=True, max_tokens=1)
    assert info.value.body["param"] == "echo" and "suffix" in info.value.body["message"]
    assert len(engines[CODER].prompts) == before


def test_a_model_without_fim_tokens_answers_400(fim_server):
    client, engines = fim_server
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NO_FIM, prompt=PREFIX, suffix=SUFFIX, max_tokens=1)
    assert info.value.body["param"] == "suffix"
    assert info.value.body["message"].startswith(f"The model `{NO_FIM}` does not support fill-in-the-middle")
    assert engines[NO_FIM].prompts == []
    # nothing after the gap: a plain completion, which such a model can do
    r = client.completions.create(model=NO_FIM, prompt=PREFIX, suffix="", max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length") and len(engines[NO_FIM].prompts) == 1


def test_the_bundled_model_has_no_fim_tokens(client: openai.OpenAI, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=PREFIX, suffix=SUFFIX, max_tokens=1)
    assert info.value.status_code == 400 and info.value.body["param"] == "suffix"
    assert "does not support fill-in-the-middle" in info.value.body["message"]


def test_a_bos_written_at_the_start_of_a_raw_prompt_is_not_doubled(fim_server):
    client, engines = fim_server
    coder = engines[CODER]
    [bos] = coder.tokenize("", add_special=True, parse_special=False)
    client.completions.create(model=CODER, prompt="<｜begin▁of▁sentence｜>def add(", max_tokens=1)
    written = coder.prompts[-1]
    client.completions.create(model=CODER, prompt="def add(", max_tokens=1)
    assert written == coder.prompts[-1] and written[0] == bos and written[1] != bos
