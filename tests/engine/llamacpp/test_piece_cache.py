"""Tokenizing chats by their pieces: the same tokens as the whole text, on real vocabularies, and each piece
tokenized once."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.piece_cache import PieceTokenizer, SpecialToken, choose_markers, entry_bytes
from deepserve.engine.llamacpp.runner import LlamaRunner
from tests.tiny_gguf import SPECS


def test_chat_markers_are_cut_before():
    assert choose_markers([SpecialToken("<|im_start|>"), SpecialToken("<|im_end|>")]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("specials", [
    [SpecialToken("<mask>", lstrip=True)],  # eats the whitespace before it, which a cut leaves in the piece before
    [SpecialToken("\n\n")],  # whitespace: other tokens' lstrip/rstrip may trim it
    [SpecialToken("<a><a")],  # overlaps itself
    [SpecialToken("<tool>", control=False)],  # user-defined: not a candidate
    [SpecialToken("<|im_end|>"), SpecialToken("|>next")],  # the end of one is the start of the other
], ids=["lstrip", "whitespace", "self-overlap", "user-defined", "overlapping"])
def test_tokens_a_cut_before_could_change_are_not_markers(specials):
    assert choose_markers(specials) == []


def test_a_token_inside_a_longer_one_is_not_a_marker_but_the_longer_one_is():
    # llama.cpp cuts the longer <x><y> out first, so an <x> inside it is not cut at: no cut before <x>.
    assert choose_markers([SpecialToken("<x>"), SpecialToken("<x><y>")]) == ["<x><y>"]
    assert choose_markers([SpecialToken("<s>"), SpecialToken("s>", control=False)]) == ["<s>"]


def char_tokenizer(calls: list[str]):
    """A stand-in whole-text tokenizer: one token per character, a marker one token."""
    def tokenize(text: str) -> list[int]:
        calls.append(text)
        tokens, i = [], 0
        while i < len(text):
            if text.startswith("<M>", i):
                tokens.append(-1)
                i += 3
            else:
                tokens.append(ord(text[i]))
                i += 1
        return tokens
    return tokenize


def test_each_piece_is_tokenized_once():
    calls: list[str] = []
    pieces = PieceTokenizer(char_tokenizer(calls), ["<M>"], checked_calls=0)
    first = pieces.tokenize("system prompt<M>user one<M>reply")
    assert calls == ["system prompt", "<M>user one", "<M>reply"]
    calls.clear()
    second = pieces.tokenize("system prompt<M>user two<M>reply")
    assert calls == ["<M>user two"]  # the others came from the cache
    assert first == char_tokenizer([])("system prompt<M>user one<M>reply")
    assert second == char_tokenizer([])("system prompt<M>user two<M>reply")
    assert (pieces.num_hits, pieces.num_misses) == (2, 4)


def test_least_recently_used_pieces_go_first_within_the_bound():
    calls: list[str] = []
    piece_bytes = entry_bytes("<M>b", 2)  # every piece below: a marker and a letter, two tokens
    pieces = PieceTokenizer(char_tokenizer(calls), ["<M>"], max_bytes=4 * piece_bytes, checked_calls=0)
    for text in ("<M>a<M>b", "<M>a<M>c", "<M>a<M>d"):  # four pieces kept, the bound; "<M>a" used last
        pieces.tokenize(text)
    pieces.tokenize("<M>a<M>e")  # a fifth: the least recently used piece (<M>b) goes
    calls.clear()
    pieces.tokenize("<M>a<M>c<M>b")  # <M>c still kept, <M>b tokenized again
    assert calls == ["<M>b"]


def test_a_piece_over_a_quarter_of_the_bound_is_not_kept():
    calls: list[str] = []
    pieces = PieceTokenizer(char_tokenizer(calls), ["<M>"], max_bytes=4 * entry_bytes("x" * 10, 10),
                            checked_calls=0)
    pieces.tokenize("x" * 10)
    pieces.tokenize("x" * 11)
    pieces.tokenize("x" * 10)
    pieces.tokenize("x" * 11)
    assert calls == ["x" * 10, "x" * 11, "x" * 11]


def test_the_bound_counts_tokens_and_bookkeeping_not_only_characters():
    # Many short pieces: the characters alone would allow far more entries than the bytes do.
    calls: list[str] = []
    bound = 100 * entry_bytes("<M>00000", 6)
    pieces = PieceTokenizer(char_tokenizer(calls), ["<M>"], max_bytes=bound, checked_calls=0)
    for i in range(1000):
        pieces.tokenize(f"<M>{i:05d}")
    assert len(pieces._pieces) == 100
    assert pieces._num_bytes <= bound


def test_a_difference_from_the_whole_text_turns_piece_tokenizing_off():
    def context_sensitive(text: str) -> list[int]:  # a tokenizer for which the rule does not hold
        return [len(text)]

    pieces = PieceTokenizer(context_sensitive, ["<M>"], checked_calls=2)
    assert pieces.tokenize("ab<M>cd") == [7]  # the whole text's tokens, not the pieces' [2, 5]
    assert not pieces.enabled
    assert pieces.tokenize("ab<M>cd") == [7]


def chat_like_texts(markers: list[str], count: int, seed: int) -> list[str]:
    """Texts built the way templates write chats, and ways they do not: markers at the edges, side by side,
    between whitespace, inside words, with non-ASCII text, digits, code and a lone surrogate."""
    rng = random.Random(seed)
    words = ["Hello", " world", "\n", "\n\n", "  ", " ", "système", "数字", "🙂", "123", "4567", "def f(x):\n    ",
             "return x", "'s", "don't", "\t", "user", "assistant", "system", "?!", "\ud800", "-->", "<", ">", "|"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 14)):
            parts.append(rng.choice(markers) if rng.random() < 0.4 else rng.choice(words))
        texts.append("".join(parts))
    return texts


def assert_pieces_match_whole(runner: LlamaRunner, texts: list[str]) -> None:
    assert runner._pieces.enabled
    for text in texts:
        whole = runner._tokenize(text, False, True)
        assert runner.tokenize(text, add_special=False, parse_special=True) == whole, text
        assert runner.tokenize(text, add_special=False, parse_special=True) == whole, text  # now from the cache
    assert runner._pieces.enabled  # no check on the way turned it off


def test_bundled_vocabulary_pieces_give_the_whole_texts_tokens():
    runner = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=1, batch_size=64, num_threads=1)
    try:
        markers = choose_markers(runner._special_tokens())
        assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(markers)
        runner._pieces._checks_left = 0  # compared here, every call
        assert_pieces_match_whole(runner, chat_like_texts(markers, 300, seed=1))
        assert runner._pieces.num_hits > 0
    finally:
        runner.close()


@pytest.mark.parametrize("family", sorted(SPECS))
def test_deepseek_vocabularies_pieces_give_the_whole_texts_tokens(family, tiny_ggufs):
    runner = LlamaRunner(tiny_ggufs[family], ctx_size_per_seq=256, num_seqs=1, batch_size=64, num_threads=1)
    try:
        markers = choose_markers(runner._special_tokens())
        assert markers  # the family's chat markers (<｜User｜>, <｜Assistant｜>, …) are cut before
        runner._pieces._checks_left = 0
        assert_pieces_match_whole(runner, chat_like_texts(markers, 150, seed=2))
    finally:
        runner.close()


def test_chat_prompts_reuse_their_pieces_tokens():
    runner = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=1, batch_size=64, num_threads=1)
    try:
        system = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
        runner.tokenize(system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special=False)
        misses = runner._pieces.num_misses
        runner.tokenize(system + "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
                        add_special=False)
        assert runner._pieces.num_misses == misses + 1  # only the new user message was tokenized
        # A raw completion prompt (BOS added) and text read without special tokens take the whole-text path.
        hits = runner._pieces.num_hits
        runner.tokenize(system, add_special=True)
        runner.tokenize(system, add_special=False, parse_special=False)
        assert runner._pieces.num_hits == hits
    finally:
        runner.close()


def test_threads_tokenizing_at_once_get_the_whole_texts_tokens():
    """The event loop and the off-loop preparation threads tokenize at once (llama_tokenize releases the GIL)."""
    runner = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=1, batch_size=64, num_threads=1)
    try:
        texts = chat_like_texts(choose_markers(runner._special_tokens()), 100, seed=3)
        expected = [runner._tokenize(text, False, True) for text in texts]
        runner._pieces._checks_left = 0
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda text: runner.tokenize(text, add_special=False), texts * 4))
        assert results == expected * 4
    finally:
        runner.close()
