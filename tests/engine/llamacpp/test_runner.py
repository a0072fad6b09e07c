"""The runner on the bundled model: the llama.cpp build really decodes, and batching is faithful."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepserve.bundled import bundled_model_path
from deepserve.engine.llamacpp.runner import BatchEntry, DecodeError, LlamaRunner, sampler_seed
from deepserve.engine.types import SamplingParams


@pytest.fixture(scope="module")
def runner():
    r = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=2, batch_size=128, num_threads=2)
    yield r
    r.close()


def greedy(runner: LlamaRunner, prompts: list[list[int]], num_tokens: int,
           params: SamplingParams | None = None, seeds: list[int] | None = None) -> list[list[int]]:
    """Greedy-decode (or sample with `params`) all prompts together in one batch per step (sequence i in slot i)."""
    params = params or SamplingParams(temperature=0.0)
    samplers = [runner.new_sampler(params, seed=seeds[i] if seeds else 0) for i in range(len(prompts))]
    for seq_id in range(len(prompts)):
        runner.keep_prefix(seq_id, 0)
    rows = runner.decode([BatchEntry(i, p, 0, True) for i, p in enumerate(prompts)])
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(num_tokens):
        for i, row in enumerate(rows):
            outputs[i].append(runner.sample(samplers[i], row))
        rows = runner.decode(
            [BatchEntry(i, [outputs[i][-1]], len(p) + step, True) for i, p in enumerate(prompts)]
        )
    for s in samplers:
        runner.free_sampler(s)
    return outputs


def test_vocabulary_round_trip(runner):
    tokens = runner.tokenize("Hello world", add_special=False, parse_special=False)
    assert b"".join(runner.token_piece(t) for t in tokens) == b"Hello world"


def test_special_tokens_parse_only_when_asked(runner):
    assert runner.tokenize("<|im_end|>", add_special=False, parse_special=True) == [runner.eos_token_id]
    assert len(runner.tokenize("<|im_end|>", add_special=False, parse_special=False)) > 1
    assert runner.is_eog(runner.eos_token_id)


def test_decodes_meaningful_text(runner):
    prompt = runner.tokenize("The capital of France is", add_special=False, parse_special=False)
    (out,) = greedy(runner, [prompt], 6)
    text = b"".join(runner.token_piece(t) for t in out).decode()
    assert "Paris" in text


def test_a_batch_past_n_batch_is_refused_before_it_is_written_and_the_runner_goes_on(runner):
    """The batch's arrays hold n_batch tokens: more is refused before any is written (writing first would run
    past the arrays' end), and the next decode is unaffected."""
    prompt = runner.tokenize("The capital of France is", add_special=False, parse_special=False)
    (before,) = greedy(runner, [prompt], 4)
    too_many = [prompt[0]] * 100
    with pytest.raises(DecodeError, match="exceeds n_batch=128"):
        runner.decode([BatchEntry(0, too_many, 0, False), BatchEntry(1, too_many, 0, True)])
    assert greedy(runner, [prompt], 4) == [before]


def test_batched_greedy_decode_matches_decoding_alone(runner):
    a = runner.tokenize("One, two, three,", add_special=False, parse_special=False)
    b = runner.tokenize("The sky is", add_special=False, parse_special=False)
    together = greedy(runner, [a, b], 8)
    assert together[0] == greedy(runner, [a], 8)[0]
    assert together[1] == greedy(runner, [b], 8)[0]


def test_seeds_beyond_32_bits_sample_apart_and_each_repeats_itself(runner):
    """Cloudflare and Dataoorts document seeds up to 9999999999: cutting them to 32 bits made 1 and 2**32 + 1
    sample alike."""
    prompt = runner.tokenize("Once upon a time", add_special=False, parse_special=False)
    params = SamplingParams(temperature=1.5, max_tokens=16)
    low, high = greedy(runner, [prompt, prompt], 16, params, seeds=[1, 2**32 + 1])
    assert low != high
    assert greedy(runner, [prompt, prompt], 16, params, seeds=[2**32 + 1, 9_999_999_999])[0] == high
    assert sampler_seed(7) == 7 and sampler_seed(2**32 - 1) != 2**32 - 1  # llama.cpp's "random seed" value


def test_logprobs_are_a_distribution(runner):
    prompt = runner.tokenize("1, 2, 3,", add_special=False, parse_special=False)
    runner.keep_prefix(0, 0)
    (row,) = runner.decode([BatchEntry(0, prompt, 0, True)])
    chosen, top = runner.logprobs(row, int(runner.logits(row).argmax()), 5)
    assert top[0][1] == pytest.approx(chosen)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert 0.0 < sum(2.718281828 ** lp for _, lp in top) <= 1.0 + 1e-9


def test_the_bundled_model_has_no_fim_tokens(runner):
    assert runner.fim_token_ids() is None


def test_fim_tokens_come_from_the_gguf_vocabulary(tiny_ggufs):
    coder = LlamaRunner(tiny_ggufs["deepseek-coder"], ctx_size_per_seq=64, num_seqs=1, batch_size=64, num_threads=1)
    math = LlamaRunner(tiny_ggufs["deepseek-math"], ctx_size_per_seq=64, num_seqs=1, batch_size=64, num_threads=1)
    try:
        ids = [coder.tokenize(t, add_special=False, parse_special=True)
               for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")]
        assert coder.fim_token_ids() == tuple(i for [i] in ids)
        assert math.fim_token_ids() is None
    finally:
        coder.close()
        math.close()


def test_context_is_clamped_to_the_training_window(tiny_ggufs):
    # tiny deepseek-math says context_length 4096: asking for more gets 4096, less is kept
    big = LlamaRunner(tiny_ggufs["deepseek-math"], ctx_size_per_seq=6000, num_seqs=1, batch_size=64, num_threads=1)
    small = LlamaRunner(tiny_ggufs["deepseek-math"], ctx_size_per_seq=300, num_seqs=1, batch_size=64, num_threads=1)
    try:
        assert (big.ctx_train, big.ctx_size_per_seq, small.ctx_size_per_seq) == (4096, 4096, 300)
        assert big.num_threads == 1
    finally:
        big.close()
        small.close()


def test_default_thread_count_decodes():
    """num_threads=None (what `deepserve serve` uses without --threads) must decode: the context's own
    default thread count once exceeded the attached threadpool and llama_decode segfaulted. Run in a child
    process so a crash fails this test, not the whole session."""
    code = (
        "from deepserve.bundled import bundled_model_path\n"
        "from deepserve.engine.llamacpp.runner import BatchEntry, LlamaRunner, sampler_seed\n"
        "from deepserve.engine.types import SamplingParams\n"
        "r = LlamaRunner(str(bundled_model_path()), ctx_size_per_seq=256, num_seqs=2, batch_size=64)\n"
        "p = r.tokenize('The capital of France is', add_special=False, parse_special=False)\n"
        "s = r.new_sampler(SamplingParams(temperature=0.0), seed=0)\n"
        "(row,) = r.decode([BatchEntry(0, p, 0, True)])\n"
        "out = []\n"
        "for i in range(4):\n"
        "    out.append(r.sample(s, row))\n"
        "    (row,) = r.decode([BatchEntry(0, [out[-1]], len(p) + i, True)])\n"
        "print(b''.join(r.token_piece(t) for t in out).decode())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout


def test_entries_in_any_order_get_their_own_logits_rows(runner):
    """decode() lays the batch out by sequence id (fewer passes over the weights): each entry's row must still
    be its own sequence's logits."""
    import numpy as np

    a = runner.tokenize("The capital of France is", add_special=False)
    b = runner.tokenize("One, two, three, four,", add_special=False)
    alone = {}
    for seq_id, prompt in ((0, a), (1, b)):
        runner.keep_prefix(0, 0)
        runner.keep_prefix(1, 0)
        [row] = runner.decode([BatchEntry(seq_id, prompt, 0, True)])
        alone[seq_id] = runner.logits(row).copy()
    runner.keep_prefix(0, 0)
    runner.keep_prefix(1, 0)
    rows = runner.decode([BatchEntry(1, b, 0, True), BatchEntry(0, a[:-1], 0, False), BatchEntry(0, a[-1:], len(a) - 1, True)])
    assert rows[1] == -1
    assert int(np.argmax(runner.logits(rows[0]))) == int(np.argmax(alone[1]))
    assert int(np.argmax(runner.logits(rows[2]))) == int(np.argmax(alone[0]))
    np.testing.assert_allclose(runner.logits(rows[0]), alone[1], atol=1e-2)
    np.testing.assert_allclose(runner.logits(rows[2]), alone[0], atol=1e-2)


def constrained(runner: LlamaRunner, prompt: list[int], gbnf: str, num_tokens: int, params: SamplingParams) -> list[int]:
    grammar = runner.new_grammar(gbnf, "root")
    sampler = runner.new_sampler(params, seed=5)
    runner.keep_prefix(0, 0)
    row, out = runner.decode([BatchEntry(0, prompt, 0, True)])[0], []
    for step in range(num_tokens):
        out.append(runner.sample(sampler, row, grammar))
        row = runner.decode([BatchEntry(0, [out[-1]], len(prompt) + step, True)])[0]
    runner.free_sampler(sampler)
    runner.free_sampler(grammar)
    return out


def test_grammar_sampling_through_the_shortlist_picks_what_the_whole_vocabulary_would(runner, monkeypatch):
    from deepserve.engine.llamacpp import runner as runner_module
    from deepserve.structured import schema_grammar
    prompt = runner.tokenize("My favourite colour is", add_special=False, parse_special=False)
    gbnf = schema_grammar({"enum": [f"colour number {i}" for i in range(60)] + ["blue", "green"]}).gbnf
    greedy_params = SamplingParams(temperature=0.0)
    shortlisted = constrained(runner, prompt, gbnf, 6, greedy_params)
    monkeypatch.setattr(runner_module, "GRAMMAR_SHORTLIST", runner.num_vocab)  # the whole vocabulary every time
    assert constrained(runner, prompt, gbnf, 6, greedy_params) == shortlisted
    monkeypatch.undo()
    # a logit_bias token is always a candidate, however low the model ranks it
    rare = runner.tokenize(" zebra", add_special=False, parse_special=False)[0]
    forced = SamplingParams(temperature=0.0, logit_bias={rare: 100.0})
    free = schema_grammar({"type": "string"}).gbnf
    out = constrained(runner, prompt, free, 3, forced)
    assert rare in out


def test_plain_greedy_reads_the_highest_logit_and_picks_what_llama_cpps_greedy_sampler_picks(runner):
    """sample() takes the highest logit itself for a plain greedy chain (no logit_bias, penalties or infill);
    llama.cpp's own greedy sampler, run on the same rows, picks the same tokens."""
    import llama_cpp as llama

    prompt = runner.tokenize("The capital of France is", add_special=True)
    plain = runner.new_sampler(SamplingParams(temperature=0.0), seed=0)
    assert runner._argmax  # this one takes the fast path
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    runner.keep_prefix(0, 0)
    [row] = runner.decode([BatchEntry(0, prompt, 0, True)])
    for step in range(12):
        token = runner.sample(plain, row)
        assert token == llama.llama_sampler_sample(chain, runner._ctx, row) == int(runner.logits(row).argmax())
        [row] = runner.decode([BatchEntry(0, [token], len(prompt) + step, True)])
    llama.llama_sampler_free(chain)
    runner.free_sampler(plain)
    assert not runner._argmax
    # a bias goes through the chain, and it is obeyed
    banned = greedy(runner, [prompt], 1)[0][0]
    biased = greedy(runner, [prompt], 1, SamplingParams(temperature=0.0, logit_bias={banned: -100.0}))[0][0]
    assert biased != banned
