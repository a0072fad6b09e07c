"""Tiny random-weight GGUF files of the DeepSeek architectures, written with the `gguf` package.

The text they generate is noise, but llama.cpp loads them through the same code as the real models: the
same architecture (llama, qwen2, deepseek2 with MLA + mixture of experts), the same metadata keys and
tensor names (checked against llama.cpp's src/models/{llama,qwen2,deepseek2}.cpp and convert_hf_to_gguf),
a byte-level BPE vocabulary with the family's pre-tokenizer and special tokens, and the family's chat
template. Each file is well under a megabyte and is built in a second.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from deepserve.templates.chat import builtin_template

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# Text the tiny BPE learns its merges from: enough for common English pieces to become single tokens.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. You are a helpful assistant. "
    "Write a function in python that returns the sum of two numbers. What is two plus two? "
    "Please reason step by step, and put your final answer within a box. "
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    "Hello! How are you today? I am fine, thank you. Count to ten: one two three four five. "
) * 4


def old_r1_template() -> str:
    """DeepSeek-R1's template before DeepSeek's revision (as most R1-distill GGUFs of January 2025 carry it):
    the generation prompt ends at `<｜Assistant｜>`, leaving the `<think>` tag to the model."""
    revised = builtin_template("deepseek-r1")
    old = revised.replace("'<｜Assistant｜><think>\\n'", "'<｜Assistant｜>'")
    assert old != revised
    return old


@dataclass(frozen=True)
class TinySpec:
    """One family: architecture, tokenizer flavour, special tokens and template."""

    name: str
    architecture: str  # llama.cpp's architecture name
    tokenizer_pre: str
    bos: str
    eos: str
    control_tokens: tuple[str, ...]
    user_defined_tokens: tuple[str, ...] = ()
    template: str | None = None  # built-in template embedded as tokenizer.chat_template; None: no template
    context_length: int = 4096
    extra: dict = field(default_factory=dict)


SPECS = {
    # deepseek-coder instruct: llama architecture, EOS is <|EOT|>, FIM tokens in the vocabulary
    "deepseek-coder": TinySpec(
        name="deepseek-coder", architecture="llama", tokenizer_pre="deepseek-coder", bos=BOS, eos="<|EOT|>",
        control_tokens=(BOS, EOS, "<|EOT|>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"),
        template="deepseek-coder", context_length=16384,
    ),
    # deepseek-llm chat / deepseek-math: llama architecture; this one carries no template of its own
    "deepseek-math": TinySpec(
        name="deepseek-math", architecture="llama", tokenizer_pre="deepseek-llm", bos=BOS, eos=EOS,
        control_tokens=(BOS, EOS), template=None, context_length=4096,
    ),
    # R1 distills on Qwen2.5: qwen2 architecture (q/k/v biases), <think> tokens
    "deepseek-r1-distill-qwen": TinySpec(
        name="deepseek-r1-distill-qwen", architecture="qwen2", tokenizer_pre="deepseek-r1-qwen", bos=BOS, eos=EOS,
        control_tokens=(BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<|vision_pad|>"),
        user_defined_tokens=("<think>", "</think>"), template="deepseek-r1", context_length=131072,
    ),
    # R1 / V3: deepseek2 architecture, MLA attention + routed and shared experts after one dense layer
    "deepseek-r1": TinySpec(
        name="deepseek-r1", architecture="deepseek2", tokenizer_pre="deepseek-v3", bos=BOS, eos=EOS,
        control_tokens=(BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                        "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                        "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"),
        user_defined_tokens=("<think>", "</think>"), template="deepseek-r1", context_length=163840,
    ),
}

# Not a DeepSeek model: Qwen2.5-Coder's repo-level fill-in-the-middle tokens (llama.cpp finds them by their text), for
# the /infill prompt llama-server writes with them (the model llama.vim and llama.vscode recommend).
QWEN_CODER = TinySpec(
    name="qwen-coder", architecture="qwen2", tokenizer_pre="qwen2", bos="<|endoftext|>", eos="<|endoftext|>",
    control_tokens=("<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>",
                    "<|file_sep|>"),
)


# ---- vocabulary ---------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what byte-level BPE vocabularies store)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _train_bpe(num_merges: int) -> tuple[list[str], list[str]]:
    """Byte-level BPE on the corpus: the 256 byte tokens plus one token per learned merge."""
    byte_char = _bytes_to_unicode()
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", _CORPUS))
    splits = {w: [byte_char[b] for b in w.encode()] for w in words}
    tokens = [byte_char[b] for b in range(256)]
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, count in words.items():
            parts = splits[w]
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return tokens, merges


# ---- weights ------------------------------------------------------------------------------------------------------

_N_EMBD = 64
_N_HEAD = 4
_N_FF = 128


class _Weights:
    def __init__(self, writer: gguf.GGUFWriter, seed: int):
        self._writer = writer
        self._rng = np.random.default_rng(seed)

    def add(self, tensor: gguf.MODEL_TENSOR, shape: tuple[int, ...], bid: int | None = None, *, suffix: str = "weight",
            ones: bool = False) -> None:
        """`shape` is numpy order: the reverse of llama.cpp's ne[] (rows last there, first here)."""
        name = gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix
        data = np.ones(shape, np.float32) if ones else (self._rng.standard_normal(shape) * 0.05).astype(np.float32)
        self._writer.add_tensor(name, data)


def _llama_like(writer: gguf.GGUFWriter, w: _Weights, arch: str, n_vocab: int, n_layer: int, biases: bool) -> None:
    n_head_kv = 2
    head_dim = _N_EMBD // _N_HEAD
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    T = gguf.MODEL_TENSOR
    w.add(T.TOKEN_EMBD, (n_vocab, _N_EMBD))
    w.add(T.OUTPUT_NORM, (_N_EMBD,), ones=True)
    w.add(T.OUTPUT, (n_vocab, _N_EMBD))
    for i in range(n_layer):
        w.add(T.ATTN_NORM, (_N_EMBD,), i, ones=True)
        w.add(T.ATTN_Q, (_N_EMBD, _N_EMBD), i)
        w.add(T.ATTN_K, (n_head_kv * head_dim, _N_EMBD), i)
        w.add(T.ATTN_V, (n_head_kv * head_dim, _N_EMBD), i)
        if biases:  # Qwen2 has q/k/v biases
            w.add(T.ATTN_Q, (_N_EMBD,), i, suffix="bias")
            w.add(T.ATTN_K, (n_head_kv * head_dim,), i, suffix="bias")
            w.add(T.ATTN_V, (n_head_kv * head_dim,), i, suffix="bias")
        w.add(T.ATTN_OUT, (_N_EMBD, _N_EMBD), i)
        w.add(T.FFN_NORM, (_N_EMBD,), i, ones=True)
        w.add(T.FFN_GATE, (_N_FF, _N_EMBD), i)
        w.add(T.FFN_UP, (_N_FF, _N_EMBD), i)
        w.add(T.FFN_DOWN, (_N_EMBD, _N_FF), i)


def _deepseek2(writer: gguf.GGUFWriter, w: _Weights, n_vocab: int) -> None:
    """DeepSeek-V3 / R1 shape in miniature: MLA with q and kv LoRA ranks, 1 dense layer then 2 MoE layers with
    8 routed experts (2 used, in 4 groups of which 2 are picked, sigmoid gating with a selection bias) and
    one shared expert. MLA is stored the way convert_hf_to_gguf writes it: MQA over the compressed KV, with
    attn_k_b / attn_v_b to decompress."""
    n_layer, n_dense = 3, 1
    q_lora, kv_lora = 32, 32
    qk_nope, qk_rope, v_head = 16, 8, 16
    n_expert, n_expert_used, n_shared, n_ff_exp = 8, 2, 1, 32
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(1)  # MLA runs as MQA over the compressed cache
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(n_vocab)
    writer.add_leading_dense_block_count(n_dense)
    writer.add_q_lora_rank(q_lora)
    writer.add_kv_lora_rank(kv_lora)
    writer.add_key_length(kv_lora + qk_rope)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(qk_nope + qk_rope)
    writer.add_value_length_mla(v_head)
    writer.add_rope_dimension_count(qk_rope)
    writer.add_expert_feed_forward_length(n_ff_exp)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(n_expert_used)
    writer.add_expert_shared_count(n_shared)
    writer.add_expert_group_count(4)
    writer.add_expert_group_used_count(2)
    writer.add_expert_weights_scale(2.5)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    T = gguf.MODEL_TENSOR
    w.add(T.TOKEN_EMBD, (n_vocab, _N_EMBD))
    w.add(T.OUTPUT_NORM, (_N_EMBD,), ones=True)
    w.add(T.OUTPUT, (n_vocab, _N_EMBD))
    for i in range(n_layer):
        w.add(T.ATTN_NORM, (_N_EMBD,), i, ones=True)
        w.add(T.ATTN_Q_A_NORM, (q_lora,), i, ones=True)
        w.add(T.ATTN_KV_A_NORM, (kv_lora,), i, ones=True)
        w.add(T.ATTN_Q_A, (q_lora, _N_EMBD), i)
        w.add(T.ATTN_Q_B, (_N_HEAD * (qk_nope + qk_rope), q_lora), i)
        w.add(T.ATTN_KV_A_MQA, (kv_lora + qk_rope, _N_EMBD), i)
        w.add(T.ATTN_K_B, (_N_HEAD, kv_lora, qk_nope), i)
        w.add(T.ATTN_V_B, (_N_HEAD, v_head, kv_lora), i)
        w.add(T.ATTN_OUT, (_N_EMBD, _N_HEAD * v_head), i)
        w.add(T.FFN_NORM, (_N_EMBD,), i, ones=True)
        if i < n_dense:
            w.add(T.FFN_GATE, (_N_FF, _N_EMBD), i)
            w.add(T.FFN_UP, (_N_FF, _N_EMBD), i)
            w.add(T.FFN_DOWN, (_N_EMBD, _N_FF), i)
        else:
            w.add(T.FFN_GATE_INP, (n_expert, _N_EMBD), i)
            w.add(T.FFN_EXP_PROBS_B, (n_expert,), i, suffix="bias")
            w.add(T.FFN_GATE_EXP, (n_expert, n_ff_exp, _N_EMBD), i)
            w.add(T.FFN_UP_EXP, (n_expert, n_ff_exp, _N_EMBD), i)
            w.add(T.FFN_DOWN_EXP, (n_expert, _N_EMBD, n_ff_exp), i)
            w.add(T.FFN_GATE_SHEXP, (n_ff_exp * n_shared, _N_EMBD), i)
            w.add(T.FFN_UP_SHEXP, (n_ff_exp * n_shared, _N_EMBD), i)
            w.add(T.FFN_DOWN_SHEXP, (_N_EMBD, n_ff_exp * n_shared), i)


def build_tiny_gguf(path: str | Path, family: str, *, seed: int = 0, num_merges: int = 160,
                    chat_template: str | None = None, spec: TinySpec | None = None) -> Path:
    """Write the tiny model of `family` (a key of SPECS, or `spec` itself) to `path` and return the path.
    `chat_template` replaces the family's built-in template as the one the file carries."""
    spec = spec or SPECS[family]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), spec.architecture)
    writer.add_name(f"tiny-{spec.name}")
    writer.add_context_length(spec.context_length)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, merges = _train_bpe(num_merges)
    token_types = [gguf.TokenType.NORMAL] * len(tokens)
    for text in spec.control_tokens:
        tokens.append(text)
        token_types.append(gguf.TokenType.CONTROL)
    for text in spec.user_defined_tokens:
        tokens.append(text)
        token_types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(spec.tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(spec.bos))
    writer.add_eos_token_id(tokens.index(spec.eos))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    elif spec.template:
        writer.add_chat_template(builtin_template(spec.template))

    weights = _Weights(writer, seed)
    if spec.architecture == "deepseek2":
        _deepseek2(writer, weights, len(tokens))
    else:
        _llama_like(writer, weights, spec.architecture, len(tokens), n_layer=2, biases=spec.architecture == "qwen2")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
