"""The only module that imports llama_cpp: model, context, batch, samplers and per-sequence KV.

Everything here runs on the engine thread, except the read-only vocabulary helpers (tokenize,
token pieces, metadata), which the HTTP side may call concurrently: they only read the model.
ctypes releases the GIL for each foreign call, so a long `llama_decode` does not block the HTTP loop.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import llama_cpp.llama_cpp as llama_bindings
import numpy as np

from deepserve.engine.llamacpp.piece_cache import PieceTokenizer, SpecialToken, choose_markers
from deepserve.engine.types import SamplingParams

_backend_lock = threading.Lock()
_backend_ready = False
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_CONT = 5
_llama_log = logging.getLogger("llama.cpp")
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # struct llama_token_data


@llama.llama_log_callback
def _forward_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp prints hundreds of load-time lines; keep warnings and errors, in our logging.
    if _GGML_LOG_LEVEL_WARN <= level < _GGML_LOG_LEVEL_CONT and text:
        _llama_log.warning(text.decode("utf-8", errors="replace").rstrip())


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama.llama_log_set(_forward_log, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_ready = True


_MASK64 = (1 << 64) - 1
_LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama_sampler_init_dist takes it as "pick a random seed"


def sampler_seed(seed: int) -> int:
    """A request's seed as llama.cpp's 32-bit one. Seeds that fit stay as they are (llama-server gives the same
    sample for the same seed); larger ones (Cloudflare and Dataoorts document 1-9999999999) are mixed
    (splitmix64) rather than cut to their low 32 bits, so 1 and 2**32 + 1 do not sample alike. Never the value
    that would make the sample random."""
    if 0 <= seed < _LLAMA_DEFAULT_SEED:
        return seed
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z = (z ^ (z >> 31)) & 0xFFFFFFFF
    return z if z != _LLAMA_DEFAULT_SEED else 0


GRAMMAR_SHORTLIST = 1024  # candidates a grammar is tried on before the whole vocabulary (runner._pick)


def _token_array(candidates: np.ndarray) -> llama.llama_token_data_array:
    """A llama_token_data_array over a numpy array of _TOKEN_DATA (not copied: samplers write through it)."""
    return llama.llama_token_data_array(data=candidates.ctypes.data_as(llama.llama_token_data_p),
                                        size=len(candidates), selected=-1, sorted=False)


def _address(pointer: object) -> int | None:
    """A llama.cpp object's address: a hashable key for it (ctypes pointers are not)."""
    return ctypes.cast(pointer, ctypes.c_void_p).value


@dataclass(slots=True)
class BatchEntry:
    """Tokens of one sequence to put into the next decode, starting at KV position `start_pos`."""

    seq_id: int
    tokens: list[int]
    start_pos: int
    want_logits: bool
    all_logits: bool = False  # logits for every token (prompt logprobs); the row returned is still the last's


class DecodeError(RuntimeError):
    pass


def _bytes_pointer(array: np.ndarray):
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class _ThreadpoolParams(ctypes.Structure):
    # ggml.h `struct ggml_threadpool_params` (GGML_MAX_N_THREADS = 512)
    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _new_threadpool(num_threads: int, poll: int | None, cpus: tuple[int, ...] | None = None) -> int:
    """A ggml CPU threadpool with the given polling level (None: ggml's default), its threads pinned one to each
    of `cpus` (if given).

    The bindings do not wrap llama_attach_threadpool, so we call the C API directly. The polling level
    matters only to ggml's own thread pool (a build with GGML_OPENMP=OFF): its workers spin (level 50)
    between graph computations, exactly when the Python side samples and writes HTTP, and 0 makes them
    sleep. The build `make` makes uses OpenMP (llama.cpp's default), which ignores it: there libgomp's
    workers spin for GOMP_SPINCOUNT at each barrier and between computations. Measured on the 2-core VM, a
    GGML_OPENMP=OFF build of the pinned version was far slower at every polling level tried (0, 1 and 50; about
    0.3 tok/s at 1 stream against ~70), so OpenMP stays.

    Why pin: llama.cpp's threads meet at a spinning barrier after every operation, so two of them on one CPU
    (the scheduler moves them when the HTTP loop or a client wakes up next to them) stall the whole step.
    ggml applies the mask (strict: thread i on the i-th CPU) at every graph computation, OpenMP build
    included. Measured on the 2-core VM at 8 streams, 8 interleaved rounds: 99.8 -> 108.3 tok/s, ITL p50 75.8
    -> 71.7 ms (llama-server 109.7 tok/s, 70.5 ms).
    """
    lib_dir = Path(llama.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    base.ggml_threadpool_params_default.restype = _ThreadpoolParams
    base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    params = base.ggml_threadpool_params_default(num_threads)
    if poll is not None:
        params.poll = poll
    if cpus:
        for index in cpus:
            params.cpumask[index] = True
        params.strict_cpu = True
    pool = cpu.ggml_threadpool_new(ctypes.byref(params))
    if not pool:
        raise RuntimeError("could not create a ggml threadpool")
    return pool


def _free_threadpool(pool: int) -> None:
    cpu = ctypes.CDLL(str(Path(llama.__file__).parent / "lib" / "libggml-cpu.so"))
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free(pool)


class LlamaRunner:
    def __init__(
        self,
        model_path: str,
        *,
        ctx_size_per_seq: int,
        num_seqs: int,
        batch_size: int = 512,
        num_threads: int | None = None,
        kv_unified: bool = False,
        poll: int | None = 0,
        cpus: tuple[int, ...] | None = None,
    ):
        _init_backend()
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama.llama_model_load_from_file(model_path.encode(), model_params)
        if not self._model:
            raise RuntimeError(f"could not load model from {model_path}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.num_vocab = llama.llama_vocab_n_tokens(self._vocab)
        n_ctx_train = llama.llama_model_n_ctx_train(self._model)
        if 0 < n_ctx_train < ctx_size_per_seq:
            # Past its training window a model without RoPE scaling writes garbage (Ollama clamps too).
            _llama_log.warning("%s was trained on %d tokens of context: its context is clamped from %d to %d",
                               Path(model_path).name, n_ctx_train, ctx_size_per_seq, n_ctx_train)
            ctx_size_per_seq = n_ctx_train
        self.ctx_size_per_seq = ctx_size_per_seq
        self.num_seqs = num_seqs
        self.batch_size = batch_size

        ctx_params = llama.llama_context_default_params()
        ctx_params.n_ctx = ctx_size_per_seq * num_seqs
        ctx_params.n_batch = batch_size
        ctx_params.n_ubatch = batch_size
        ctx_params.n_seq_max = num_seqs
        ctx_params.kv_unified = kv_unified
        # Always set: the context's default (GGML_DEFAULT_N_THREADS = 4) must never exceed the threadpool
        # attached below, or ggml indexes workers that do not exist and llama_decode segfaults.
        threads = num_threads or os.cpu_count() or 1
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise RuntimeError("could not create a llama.cpp context (out of memory?)")
        self._threadpool = None
        self.num_threads = threads
        # One CPU per thread, or none pinned (fewer CPUs than threads: two threads on one CPU is the worst case).
        self.cpus = tuple(cpus[:threads]) if cpus and len(cpus) >= threads else None
        if poll is not None or self.cpus:
            self._threadpool = _new_threadpool(threads, poll, self.cpus)
            attach = llama_bindings._lib.llama_attach_threadpool
            attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            attach.restype = None
            attach(self._ctx, self._threadpool, self._threadpool)
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(batch_size, 0, 1)
        # Chat prompts tokenized by their pieces between special tokens, each piece's tokens kept (piece_cache.py).
        try:
            markers = choose_markers(self._special_tokens())
        except UnicodeDecodeError:  # a special token that is not UTF-8 text: cut nowhere, tokenize whole texts
            markers = []
        self._pieces = PieceTokenizer(lambda text: self._tokenize(text, False, True), markers)
        self._piece_cache: dict[int, bytes] = {}
        self._special_piece_cache: dict[int, bytes] = {}
        self._candidates: np.ndarray | None = None  # llama_token_data[n_vocab], for grammar-constrained sampling
        self._biased: dict[int, np.ndarray] = {}  # sampler -> its logit_bias token ids (always in the shortlist)
        self._argmax: set[int] = set()  # samplers that are plain greedy (sample() takes the highest logit itself)
        self._closed = False

    # ---- model facts -------------------------------------------------------------------------
    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    @property
    def ctx_train(self) -> int:
        return llama.llama_model_n_ctx_train(self._model)

    @property
    def bos_token_id(self) -> int:
        return llama.llama_vocab_bos(self._vocab)

    @property
    def eos_token_id(self) -> int:
        return llama.llama_vocab_eos(self._vocab)

    @property
    def adds_bos(self) -> bool:
        return bool(llama.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        """The vocabulary entry of a token, special tokens included (e.g. `<|im_end|>`)."""
        raw = llama.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def fim_token_ids(self) -> tuple[int, int, int] | None:
        """Fill-in-the-middle prefix, suffix and middle tokens: from the GGUF's tokenizer.ggml.fim_*_token_id, or
        found by llama.cpp by their text (DeepSeek's `<｜fim▁begin｜>`, Qwen's `<|fim_prefix|>`, ...). None when the
        vocabulary lacks any of the three."""
        ids = (llama.llama_vocab_fim_pre(self._vocab), llama.llama_vocab_fim_suf(self._vocab),
               llama.llama_vocab_fim_mid(self._vocab))
        return None if llama.LLAMA_TOKEN_NULL in ids else ids

    def fim_repo_token_ids(self) -> tuple[int | None, int | None]:
        """The repository and file separator tokens of a repo-level FIM vocabulary (Qwen2.5-Coder's `<|repo_name|>`
        and `<|file_sep|>`); None for each the vocabulary lacks."""
        ids = (llama.llama_vocab_fim_rep(self._vocab), llama.llama_vocab_fim_sep(self._vocab))
        return tuple(None if token == llama.LLAMA_TOKEN_NULL else token for token in ids)  # type: ignore[return-value]

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    # ---- text <-> tokens ---------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if parse_special and not add_special:  # a chat prompt (or what reads like one): by its pieces, cached
            return self._pieces.tokenize(text)
        return self._tokenize(text, add_special, parse_special)

    def piece_cache_stats(self) -> dict:
        return self._pieces.stats()

    def _special_tokens(self) -> list[SpecialToken]:
        """Each token llama.cpp matches as special when it parses special tokens (piece_cache.choose_markers)."""
        special = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED | llama.LLAMA_TOKEN_ATTR_UNKNOWN
        tokens = []
        for token in range(self.num_vocab):
            attr = llama.llama_vocab_get_attr(self._vocab, token)
            if attr & special:
                text = (llama.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8")
                tokens.append(SpecialToken(text, lstrip=bool(attr & llama.LLAMA_TOKEN_ATTR_LSTRIP),
                                           control=bool(attr & llama.LLAMA_TOKEN_ATTR_CONTROL)))
        return tokens

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON): U+FFFD, as a UTF-8 decoder would
            data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:n])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """Bytes a token stands for when shown to a user (control tokens render as nothing, unless
        `special`: then they render as their text, e.g. DeepSeek's tool-call markers)."""
        cache = self._special_piece_cache if special else self._piece_cache
        piece = cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = buf.raw[:n]
            cache[token] = piece
        return piece

    # ---- KV cache ----------------------------------------------------------------------------
    def keep_prefix(self, seq_id: int, num_keep: int) -> None:
        """Drop this sequence's KV from position `num_keep` on (0 drops it all)."""
        if not llama.llama_memory_seq_rm(self._memory, seq_id, num_keep, -1):
            llama.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            raise DecodeError(f"could not trim the KV cache of sequence {seq_id} to {num_keep} tokens")

    def num_positions(self, seq_id: int) -> int:
        """Positions 0..n-1 of this sequence that the KV holds (n = its highest position + 1; 0 when empty)."""
        return llama.llama_memory_seq_pos_max(self._memory, seq_id) + 1

    def save_state(self, seq_id: int) -> np.ndarray:
        """A copy of this sequence's KV (llama_state_seq_get_data_ext), for the host-memory prompt cache and for
        copies between slots. (An uninitialised numpy buffer: a zero-filled ctypes array cost twice the copy.)"""
        size = llama.llama_state_seq_get_size_ext(self._ctx, seq_id, llama.LLAMA_STATE_SEQ_FLAGS_NONE)
        buffer = np.empty(size, dtype=np.uint8)
        written = llama.llama_state_seq_get_data_ext(self._ctx, _bytes_pointer(buffer), size, seq_id,
                                                     llama.LLAMA_STATE_SEQ_FLAGS_NONE)
        if written != size:
            raise DecodeError(f"could not save the KV cache of sequence {seq_id} ({written} of {size} bytes)")
        return buffer

    def load_state(self, seq_id: int, state: np.ndarray) -> bool:
        """Replace this sequence's KV with a saved copy. False (and the sequence empty) if it did not fit."""
        read = llama.llama_state_seq_set_data_ext(self._ctx, _bytes_pointer(state), len(state), seq_id,
                                                  llama.LLAMA_STATE_SEQ_FLAGS_NONE)
        if read != len(state):
            llama.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            return False
        return True

    # ---- decode ------------------------------------------------------------------------------
    def decode(self, entries: list[BatchEntry]) -> list[int]:
        """Run one llama_decode over all entries; return each entry's logits row (-1: none).

        The batch is laid out by sequence id. Why: with one KV stream per slot (--kv-split, the default),
        llama.cpp cuts a batch into micro-batches of consecutive sequence ids in batch order (split_equal,
        sequential), and each micro-batch is a whole pass over the weights. Sequences 3,0,5,1 in that order
        made three passes; 0,1,3,5 makes two, 0,1,2,3 one. Measured on the 2-core VM, 8 single-token
        sequences: 147 ms a step sorted, 206 ms in admission order."""
        num_tokens = sum(len(entry.tokens) for entry in entries)
        if num_tokens > self.batch_size:  # before filling: the batch's arrays hold batch_size tokens
            raise DecodeError(f"batch of {num_tokens} tokens exceeds n_batch={self.batch_size}")
        batch = self._batch
        n = 0
        rows: list[int] = [-1] * len(entries)
        for index in sorted(range(len(entries)), key=lambda i: entries[i].seq_id):
            entry = entries[index]
            pos = entry.start_pos
            seq_id = entry.seq_id
            for token in entry.tokens:
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = entry.all_logits
                pos += 1
                n += 1
            if entry.want_logits or entry.all_logits:
                batch.logits[n - 1] = 1
                rows[index] = n - 1
        batch.n_tokens = n
        rc = llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}")
        return rows

    def logits(self, row: int) -> np.ndarray:
        ptr = llama.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.num_vocab,))

    # ---- sampling ----------------------------------------------------------------------------
    def new_sampler(self, params: SamplingParams, seed: int, prompt: list[int] | None = None) -> int:
        """The request's sampler chain. With llama-server's penalty window (params.penalty_last_n), the prompt's
        last tokens are fed to it first, as llama-server does, so that the penalties count them too."""
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = lambda s: llama.llama_sampler_chain_add(chain, s)  # noqa: E731
        if params.logit_bias:  # first, as llama.cpp's own sampler does: it shifts what every later stage sees
            biases = (llama.llama_logit_bias * len(params.logit_bias))(
                *(llama.llama_logit_bias(token=t, bias=b) for t, b in params.logit_bias.items())
            )
            add(llama.llama_sampler_init_logit_bias(self.num_vocab, len(biases), biases))
            self._biased[_address(chain)] = np.fromiter(params.logit_bias, dtype=np.int32)
        penalized = params.penalty_last_n != 0 and (
            params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty))
        if params.penalty_last_n is None:
            # Window = everything this request may generate (prompt tokens are not fed to the chain), so
            # frequency/presence penalties follow OpenAI's "tokens so far" meaning.
            window = max(64, min(params.max_tokens, 4096))
        else:  # llama-server's last n tokens (-1: the window), the prompt's fed below
            window = self.ctx_size_per_seq if params.penalty_last_n < 0 else params.penalty_last_n
        if penalized:
            add(
                llama.llama_sampler_init_penalties(
                    self.num_vocab,
                    window,
                    params.repetition_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0.0:
            if params.infill:
                add(llama.llama_sampler_init_infill(self._vocab))
            add(llama.llama_sampler_init_greedy())
            if not (params.logit_bias or penalized or params.infill):
                self._argmax.add(_address(chain))  # the chain would only pick the highest logit: sample() does
        else:
            if params.top_k > 0:
                add(llama.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(llama.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(llama.llama_sampler_init_min_p(params.min_p, 1))
            if params.infill:  # where llama.vim's ["top_k", "top_p", "infill"] puts it: after the cut-offs
                add(llama.llama_sampler_init_infill(self._vocab))
            add(llama.llama_sampler_init_temp(params.temperature))
            add(llama.llama_sampler_init_dist(sampler_seed(seed)))
        if penalized and params.penalty_last_n is not None:
            for token in (prompt or [])[-window:]:
                llama.llama_sampler_accept(chain, token)
        return chain

    def sample(self, sampler: int, row: int, grammar: int | None = None) -> int:
        """Sample from a logits row; the chain also records the token (penalties need the history).

        With a grammar sampler, the token must be one the grammar allows, and both record it. As llama.cpp's
        own sampler does, the chain first picks from the unconstrained row and the grammar checks only that
        token; only when it refuses it does the grammar filter the whole vocabulary (slow: every token's text
        against the grammar) and the chain pick again. The grammar is kept apart from the chain so that the
        engine decides when it starts to apply (after a reasoning model's `</think>`)."""
        if grammar is None:
            if _address(sampler) in self._argmax:
                # Plain greedy: the highest logit, read in place (8 µs) rather than through the chain, which first
                # copies the whole vocabulary into a candidate array (54 µs a token on the 2-core VM). Ties go to
                # the lowest id in both. The chain has nothing to record.
                return int(np.argmax(self.logits(row)))
            return llama.llama_sampler_sample(sampler, self._ctx, row)
        token = self._pick(sampler, row, None)
        one = np.array([(token, 0.0, 0.0)], dtype=_TOKEN_DATA)
        llama.llama_sampler_apply(grammar, ctypes.byref(_token_array(one)))
        if not math.isfinite(float(one["logit"][0])):
            token = self._pick(sampler, row, grammar)
        llama.llama_sampler_accept(sampler, token)
        llama.llama_sampler_accept(grammar, token)
        return token

    def _pick(self, sampler: int, row: int, grammar: int | None) -> int:
        """Apply the grammar (if any), then the chain, to a logits row; the chosen token, not yet recorded.

        With a grammar, the shortlist of the GRAMMAR_SHORTLIST highest logits (and any logit_bias token) goes
        through it first, and the whole vocabulary only if the grammar allows none of them. Why: llama.cpp's
        grammar filter tests each candidate's text against every open alternative; over 49,152 tokens that is
        ~20 ms a token for a 10-value enum and ~1.2 s for 1,000 values (measured on the bundled model), paid by
        every sequence in the step. Greedy picks the same token either way; sampling loses only tokens outside
        the shortlist, which carry next to no probability."""
        if grammar is not None:
            token = self._pick_from_shortlist(sampler, row, grammar)
            if token is not None:
                return token
        candidates = self._candidates
        if candidates is None:
            candidates = self._candidates = np.zeros(self.num_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = np.arange(self.num_vocab, dtype=np.int32)
        candidates["logit"] = self.logits(row)
        candidates["p"] = 0.0
        array = _token_array(candidates)
        if grammar is not None:
            llama.llama_sampler_apply(grammar, ctypes.byref(array))
        llama.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise DecodeError("the sampler chose no token")
        chosen = array.data[array.selected]  # through the array: a sampler may have re-pointed it
        if not math.isfinite(chosen.logit):
            raise DecodeError("the grammar allows no token here")
        return int(chosen.id)

    def _pick_from_shortlist(self, sampler: int, row: int, grammar: int) -> int | None:
        if self.num_vocab <= 2 * GRAMMAR_SHORTLIST:
            return None  # a small vocabulary: the whole of it is about as cheap
        logits = self.logits(row)
        ids = np.argpartition(logits, -GRAMMAR_SHORTLIST)[-GRAMMAR_SHORTLIST:].astype(np.int32)
        biased = self._biased.get(_address(sampler))
        if biased is not None:
            ids = np.union1d(ids, biased).astype(np.int32)
        short = np.zeros(len(ids), dtype=_TOKEN_DATA)
        short["id"] = ids
        short["logit"] = logits[ids]
        array = _token_array(short)
        llama.llama_sampler_apply(grammar, ctypes.byref(array))
        if not np.isfinite(short["logit"][: array.size]).any():
            return None  # the grammar wants a token the model ranks lower: the whole vocabulary then
        llama.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        chosen = array.data[array.selected]
        return int(chosen.id) if math.isfinite(chosen.logit) else None

    @staticmethod
    def accept(sampler: int, token: int) -> None:
        """Record a token the engine chose itself (a forced `</think>`), as if the sampler had picked it."""
        llama.llama_sampler_accept(sampler, token)

    def new_grammar(self, gbnf: str, root: str) -> int:
        """A grammar sampler (GBNF); ValueError if llama.cpp cannot parse the grammar."""
        sampler = llama.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), root.encode("utf-8"))
        if not sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        return sampler

    def free_sampler(self, sampler: int) -> None:
        self._biased.pop(_address(sampler), None)
        self._argmax.discard(_address(sampler))
        llama.llama_sampler_free(sampler)

    def logprobs(self, row: int, token: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
        """Log-probability of `token` under the raw model distribution, plus the `num_top` best."""
        return self.logprobs_of_rows(row, [token], num_top)[0]

    def logprobs_of_rows(
        self, first_row: int, tokens: list[int], num_top: int
    ) -> list[tuple[float, list[tuple[int, float]]]]:
        """`logprobs` of tokens[k] under row first_row + k, for consecutive rows of one entry (all_logits), in
        one numpy pass over the rows instead of one per token (prompt scoring runs on the engine thread)."""
        n, vocab = len(tokens), self.num_vocab
        first = llama.llama_get_logits_ith(self._ctx, first_row)
        last = llama.llama_get_logits_ith(self._ctx, first_row + n - 1)
        step = ctypes.sizeof(ctypes.c_float) * vocab
        if ctypes.cast(last, ctypes.c_void_p).value - ctypes.cast(first, ctypes.c_void_p).value != (n - 1) * step:
            # Rows not laid out one after another: one pass per row (n == 1 is always consecutive).
            return [self.logprobs_of_rows(first_row + k, [token], num_top)[0] for k, token in enumerate(tokens)]
        block = np.ctypeslib.as_array(first, shape=(n * vocab,)).reshape(n, vocab)
        peak = block.max(axis=1)
        log_z = peak + np.log(np.exp(block - peak[:, None]).sum(axis=1, dtype=np.float64))
        chosen = block[np.arange(n), np.asarray(tokens)] - log_z
        tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        if num_top > 0:
            best = np.argpartition(-block, num_top, axis=1)[:, :num_top]
            for k in range(n):
                ids = best[k][np.argsort(-block[k, best[k]])]
                tops[k] = [(int(t), float(block[k, t] - log_z[k])) for t in ids]
        return [(float(chosen[k]), tops[k]) for k in range(n)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        if self._threadpool:
            _free_threadpool(self._threadpool)
        llama.llama_model_free(self._model)
