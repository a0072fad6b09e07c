"""llama-server's `POST /infill` (what llama.vim and llama.vscode send) on the tiny deepseek-coder GGUF, served in
this process so the test sees the exact prompt tokens the real engine is given (tests/api/inprocess.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from deepserve.config import Settings
from deepserve.fim import SNIPPET_SEPARATOR
from tests.api.inprocess import serve_in_process
from tests.api.openai.test_fim import CODER, PREFIX, SUFFIX  # the same code around the same gap

KEY = "sk-infill-test"


@pytest.fixture(scope="module")
def infill_server(tiny_ggufs, tmp_path_factory):
    # A window past llama-server's 2,048-token batch, so that other files' snippets have room.
    settings = Settings(api_keys=[KEY], parallel=2, ctx_size=4096, threads=1,
                        data_dir=tmp_path_factory.mktemp("infill-data"))
    with serve_in_process(settings, [(CODER, tiny_ggufs["deepseek-coder"])]) as (url, engines):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            yield http, engines[CODER]


def text_tokens(coder, text: str) -> list[int]:
    return coder.tokenize(text, add_special=False, parse_special=False)


def test_infill_builds_the_fim_prompt_and_answers_as_llama_server(infill_server):
    http, coder = infill_server
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6, "temperature": 0, "ignore_eos": True}
    answer = http.post("/infill", json=body).json()
    expected = coder.tokenize(f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{PREFIX}<｜fim▁hole｜>{SUFFIX}<｜fim▁end｜>",
                              add_special=False, parse_special=True)
    assert coder.prompts[-1] == expected  # DeepSeek-Coder's FIM prompt, as /v1/completions with suffix builds it
    v1 = http.post("/v1/completions", json={"model": CODER, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6,
                                            "temperature": 0, "ignore_eos": True}).json()
    assert answer["content"] == v1["choices"][0]["text"]
    assert (answer["stop"], answer["stop_type"], answer["tokens_evaluated"], answer["tokens_predicted"]) == (
        True, "limit", len(expected), 6)


def test_the_prompt_goes_before_the_gap_and_snippets_before_everything_as_llama_server_puts_them(infill_server):
    http, coder = infill_server
    extra = [{"filename": "util.py", "text": "def helper():\n    pass\n"}]
    http.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "a +", "n_predict": 1,
                               "input_extra": extra})
    prompt = coder.prompts[-1]
    snippet = text_tokens(coder, SNIPPET_SEPARATOR) + text_tokens(coder, extra[0]["text"])
    bos, begin, hole, end = coder.tokenize("<｜begin▁of▁sentence｜><｜fim▁begin｜><｜fim▁hole｜><｜fim▁end｜>",
                                           add_special=False, parse_special=True)
    assert prompt == [*snippet, bos, begin, *text_tokens(coder, PREFIX), *text_tokens(coder, "a +"), hole,
                      *text_tokens(coder, SUFFIX), end]  # the snippets before BOS, where llama-server puts them


def test_a_long_prefix_keeps_its_end_as_llama_server_does(infill_server):
    http, coder = infill_server
    long_prefix = "x = 1\n" * 1000 + PREFIX
    http.post("/infill", json={"input_prefix": long_prefix, "input_suffix": SUFFIX, "n_predict": 1})
    prompt = coder.prompts[-1]
    kept = text_tokens(coder, long_prefix)[-1536:]  # 3/4 of llama-server's 2,048-token batch
    assert prompt[2:2 + len(kept)] == kept and len(prompt) == 2 + len(kept) + 1 + len(text_tokens(coder, SUFFIX)) + 1


def test_streamed_infill(infill_server):
    http, _ = infill_server
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 5, "temperature": 0, "ignore_eos": True}
    whole = http.post("/infill", json=body).json()
    with http.stream("POST", "/infill", json={**body, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    *tokens, final = [json.loads(e[6:]) for e in events]
    assert "".join(t["content"] for t in tokens) == whole["content"] and final["stop"] is True


def test_bad_input_extra_is_a_400(infill_server):
    http, _ = infill_server
    r = http.post("/infill", json={"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a.py"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_without_n_predict_the_snippets_leave_room_to_answer(infill_server):
    http, coder = infill_server
    r = http.post("/infill", json={"input_prefix": "x = 1\n" * 600, "input_suffix": "y = 2\n" * 300,
                                   "input_extra": [{"filename": "z.py", "text": "z = 3\n" * 800}], "n_predict": 1})
    assert r.status_code == 200, r.text
    r = http.post("/infill", json={"input_prefix": "x = 1\n" * 600, "input_suffix": "y = 2\n" * 300,
                                   "input_extra": [{"filename": "z.py", "text": "z = 3\n" * 800}]})
    assert r.status_code == 200, r.text
    assert len(coder.prompts[-1]) + 256 <= 4096  # INFILL_ROOM tokens left after the prompt



def test_only_the_snippets_that_fit_are_kept_the_last_ones(infill_server):
    http, coder = infill_server
    extra = [{"filename": f"f{i}.py", "text": f"value_{i} = {i}\n"} for i in range(3000)]
    http.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "input_extra": extra})
    prompt = coder.prompts[-1]
    [bos] = coder.tokenize("", add_special=True, parse_special=False)
    snippets = prompt[:prompt.index(bos)]
    assert len(snippets) == 4096 - 2048 + 2  # llama-server's budget: the window less a batch
    last = text_tokens(coder, SNIPPET_SEPARATOR) + text_tokens(coder, extra[-1]["text"])
    assert snippets[-len(last):] == last


@pytest.fixture(scope="module")
def repo_level_server(tmp_path_factory):
    from tests.tiny_gguf import QWEN_CODER, build_tiny_gguf

    path = build_tiny_gguf(tmp_path_factory.mktemp("qwen-coder") / "qwen-coder.gguf", "qwen-coder", spec=QWEN_CODER)
    settings = Settings(api_keys=[KEY], parallel=1, ctx_size=4096, threads=1,
                        data_dir=tmp_path_factory.mktemp("qwen-coder-data"))
    with serve_in_process(settings, [("tiny-qwen-coder", str(path))]) as (url, engines):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            yield http, engines["tiny-qwen-coder"]


def test_a_repo_level_vocabulary_gets_llama_servers_repo_and_file_markers(repo_level_server):
    """Qwen2.5-Coder's <|repo_name|> and <|file_sep|>: REPO "myproject\\n", each snippet after FILE_SEP and its file
    name, then FILE_SEP "filename\\n" before the FIM prefix, as llama-server's format_prompt_infill writes them."""
    http, coder = repo_level_server
    extra = [{"filename": "util.py", "text": "def add(a, b):\n    return a + b\n"}, {"text": "x = 1\n"}]
    r = http.post("/infill", json={"input_prefix": "import util\n", "input_suffix": "\nprint(x)\n", "n_predict": 1,
                                   "input_extra": extra})
    assert r.status_code == 200, r.text
    special = coder.tokenize("<|repo_name|><|file_sep|><|fim_prefix|><|fim_suffix|><|fim_middle|>",
                             add_special=False, parse_special=True)
    repo, sep, pre, suf, mid = special
    bos = coder.tokenize("", add_special=True, parse_special=False)
    t = lambda text: text_tokens(coder, text)  # noqa: E731
    assert coder.prompts[-1] == [
        repo, *t("myproject\n"), sep, *t("util.py\n"), *t(extra[0]["text"]), sep, *t("tmp\n"), *t("x = 1\n"),
        sep, *t("filename\n"), *bos, pre, *t("import util\n"), suf, *t("\nprint(x)\n"), mid]
