"""LlamaCppEngine: one thread that repeats `step()` = schedule → run → postprocess.

The HTTP side talks to it through a locked inbox (submit / abort) and per-request collectors.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from deepserve.engine.arrivals import Arrivals, reached_engine
from deepserve.engine.collector import DirectSink, Postbox, RequestCollector
from deepserve.engine.llamacpp.runner import BatchEntry, DecodeError, LlamaRunner
from deepserve.engine.llamacpp.scheduler import Admission, ScheduledChunk, Scheduler, Sequence, StepPlan
from deepserve.engine.prompt_cache import MIB, HostPromptCache
from deepserve.engine.stop import EditorStops, StopStringMatcher
from deepserve.engine.types import (
    FinishReason,
    GenerateRequest,
    RequestStatus,
    TokenDelta,
    TokenLogprob,
)
from deepserve.errors import ContextLengthError, InvalidRequestError, QueueFullError, ServiceUnavailableError
from deepserve.reasoning import FORCED_CLOSE, ReasoningShaper, prompt_reasoning_prefix
from deepserve.tools import ToolCallParser

log = logging.getLogger(__name__)
# A finished slot holding at least this many tokens is saved to the host cache while the engine idles (shorter
# ones are cheap to recompute, and an admission still saves what it overwrites by its own rule).
IDLE_SAVE_MIN_TOKENS = 64


@dataclass(slots=True)
class _SequenceState:
    collector: RequestCollector
    sampler: int | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stop: StopStringMatcher | None = None
    grammar: int | None = None  # grammar sampler: applies to the answer (after `</think>` for reasoning)
    reasoning: ReasoningShaper | None = None  # None: the output is not parsed for reasoning
    tools: ToolCallParser | None = None  # None: tool calls are not parsed
    special_pieces: bool = False  # render control tokens as their text (DeepSeek's tool-call markers)
    num_reasoning_tokens: int = 0
    close_forced: bool = False  # the engine has closed the reasoning itself (budget spent)
    num_tool_calls: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far, sent with the first token
    editor: EditorStops | None = None  # n_indent / t_max_predict_ms
    first_token_at: float | None = None


@dataclass(slots=True)
class EngineCounters:
    num_steps: int = 0
    max_seqs_in_step: int = 0  # most sequences ever decoded together in one llama_decode
    num_requests_finished: int = 0
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_shared_prompt_tokens: int = 0  # of those, copied from another running sequence's slot
    num_generated_tokens: int = 0
    num_decode_errors: int = 0
    num_burst_waits: int = 0  # waits of a first step after idle for more of a burst (_gather_burst)
    num_direct_tokens: int = 0  # tokens the engine thread wrote to their client itself (api/direct.py)


class _RequestStream:
    """One request's deltas. Closing it before its last delta (a client gone, a cancelled handler) aborts the
    request in the engine, even if nobody ever read from it: a class, not an async generator, whose close
    before the first read would run nothing (a multi-prompt completion's later prompts kept generating)."""

    __slots__ = ("_engine", "_request_id", "_collector", "_finished", "_closed")

    def __init__(self, engine: LlamaCppEngine, request_id: str, collector: RequestCollector):
        self._engine = engine
        self._request_id = request_id
        self._collector = collector
        self._finished = False
        self._closed = False

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            delta = await self._collector.next()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        self._finished = delta.finish_reason is not None
        return delta

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._finished:
                self._engine.abort(self._request_id)

    def attach_direct(self, sink: DirectSink) -> bool:
        """Let the engine thread deliver this request's plain text deltas to `sink` (api/direct.py)."""
        self._collector.direct = sink
        return True


class LlamaCppEngine:
    def __init__(
        self,
        model_path: str,
        model_id: str,
        *,
        ctx_size: int = 2048,
        parallel: int = 8,
        batch_size: int = 512,
        threads: int | None = None,
        max_queue: int = 1024,
        kv_unified: bool = False,
        poll: int | None = 0,
        deliver_wait_s: float = 0.005,
        gather_s: float = 0.004,
        gather_max_s: float = 0.03,
        cpus: tuple[int, ...] | None = None,
        cache_ram_mib: int = 8192,
        arrivals: Arrivals | None = None,
    ):
        self.model_id = model_id
        self.model_path = model_path
        self.ctx_size = ctx_size
        self.parallel = parallel
        self.max_queue = max_queue
        self.runner = LlamaRunner(
            model_path,
            ctx_size_per_seq=ctx_size,
            num_seqs=parallel,
            batch_size=batch_size,
            num_threads=threads,
            kv_unified=kv_unified,
            poll=poll,
            cpus=cpus,
        )
        self.ctx_size = self.runner.ctx_size_per_seq  # never past the model's training window
        # Slots' KV saved in RAM before new requests overwrite them (llama-server's --cache-ram; 0: off).
        self.host_cache = HostPromptCache(cache_ram_mib * MIB) if cache_ram_mib > 0 else None
        self.scheduler = Scheduler(parallel, batch_size, self.host_cache)
        # What the engine feeds to end a reasoning block whose budget is spent ("</think>\n\n").
        self._close_tokens = tuple(self.runner.tokenize(FORCED_CLOSE, add_special=False, parse_special=True))
        self.counters = EngineCounters()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, object]] = []
        # A step's deltas, handed to the HTTP side once the step's Python work is done; the next decode waits
        # (at most deliver_wait_s) until they are written to the clients (collector.Postbox says why).
        self._postbox = Postbox(deliver_wait_s)
        # A step's plain text deltas that the engine thread writes to their clients itself (api/direct.py), all
        # at the end of the step (_hand_over): one burst of writes, which the client reads in one wake-up, rather
        # than a write after each sequence's sampling.
        self._direct: list[tuple[RequestCollector, TokenDelta]] = []
        self._num_queued = 0  # submitted and not yet admitted to a slot
        self._wake = threading.Event()
        self._stopping = False
        # Coming out of idle, the first step waits while requests keep arriving (each within gather_s of the
        # last, gather_max_s at most), so that a burst starts together; with `arrivals` (the server's count of
        # requests not yet submitted), only while one is on its way: see _gather_burst.
        self.gather_s = gather_s
        self.gather_max_s = gather_max_s
        self.arrivals = arrivals
        self._idle = True
        self._idle_saved: dict[int, tuple[int, int]] = {}  # seq id -> (last used step, tokens) of its idle save
        self.quiet = threading.Event()  # set while the engine waits with nothing to decode or save (tests)
        self._thread = threading.Thread(target=self._run, name="deepserve-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side -----------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.runner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of prompt tokens (echo of a token-id prompt, /detokenize), special tokens written as their text
        (`<|im_start|>`), as llama-server and vLLM detokenize; ids outside the vocabulary give nothing."""
        pieces = b"".join(self.runner.token_piece(t, special=True) for t in tokens if 0 <= t < self.runner.num_vocab)
        return pieces.decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, special tokens as their text (a piece of a multi-byte character is
        not valid UTF-8 on its own)."""
        return self.runner.token_piece(token, special=True) if 0 <= token < self.runner.num_vocab else b""

    def fim_token_ids(self) -> tuple[int, int, int] | None:
        return self.runner.fim_token_ids()

    def fim_repo_token_ids(self) -> tuple[int | None, int | None]:
        return self.runner.fim_repo_token_ids()

    def check_grammar(self, gbnf: str, root: str = "root") -> None:
        """A client's GBNF, parsed before the request is queued: one llama.cpp refuses is the client's 400 (it
        reads the vocabulary only, as the engine thread does)."""
        try:
            self.runner.free_sampler(self.runner.new_grammar(gbnf, root))
        except ValueError:
            raise InvalidRequestError("The grammar is not valid GBNF (llama.cpp could not parse it: undefined or "
                                      "left-recursive rules, or no root rule).", param="grammar") from None

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        if num_prompt_tokens >= self.ctx_size:  # the prompt alone: max_tokens (perhaps not even sent) is not to blame
            raise ContextLengthError(
                f"This model's maximum context length is {self.ctx_size} tokens. However, your prompt is "
                f"{num_prompt_tokens} tokens, which leaves no room for the completion. Please reduce the length of "
                f"the prompt.", param="prompt", num_prompt_tokens=num_prompt_tokens, ctx_size=self.ctx_size)
        if num_prompt_tokens + max_tokens > self.ctx_size:
            raise ContextLengthError(
                f"This model's maximum context length is {self.ctx_size} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens", num_prompt_tokens=num_prompt_tokens, ctx_size=self.ctx_size,
            )

    def submit(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.check_fits(len(request.prompt_tokens), request.sampling.max_tokens)
        prompt = request.prompt_tokens
        if prompt and not (0 <= min(prompt) and max(prompt) < self.runner.num_vocab):
            # A token id outside the vocabulary fails llama_decode for the whole step: every request in it.
            bad = next(t for t in prompt if not 0 <= t < self.runner.num_vocab)
            raise InvalidRequestError(
                f"The prompt contains token id {bad}, but this model's vocabulary has {self.runner.num_vocab} "
                f"tokens (0-{self.runner.num_vocab - 1}).",
                param="prompt",
            )
        unknown = [t for t in request.sampling.logit_bias if not 0 <= t < self.runner.num_vocab]
        if unknown:
            raise InvalidRequestError(
                f"logit_bias names token {unknown[0]}, but this model's vocabulary has {self.runner.num_vocab} "
                f"tokens (0-{self.runner.num_vocab - 1}).",
                param="logit_bias",
            )
        if not self.is_ready:
            raise ServiceUnavailableError("The engine is shutting down.")
        collector = RequestCollector(asyncio.get_running_loop())
        with self._lock:
            if self._num_queued >= self.max_queue:
                raise QueueFullError(
                    f"The server is busy: {self._num_queued} requests are already waiting "
                    f"(limit {self.max_queue}). Retry shortly."
                )
            self._num_queued += 1
            request.started = False
            self._inbox.append(("submit", (request, collector)))
        reached_engine()  # before the wake: a gathering engine thread then sees it in the inbox and out of the count
        self._wake.set()
        return _RequestStream(self, request.request_id, collector)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            num_queued = self._num_queued
        c = self.counters
        # Read from the HTTP thread while the engine thread works: copies and len() only, no iteration of
        # structures it mutates. KV use counts the cells of running sequences (what a new request cannot
        # have); cached counts every cell a slot holds, idle prompt-cache entries included.
        running = list(self.scheduler.running)
        kv_used = sum(seq.num_computed for seq in running)
        kv_cached = sum(len(slot.cached_tokens) for slot in self.scheduler.slots)
        return {
            "model": self.model_id,
            "parallel": self.parallel,
            "ctx_size": self.ctx_size,
            "threads": self.runner.num_threads,
            "cpus": list(self.runner.cpus or ()),
            "num_running": len(running),
            "num_waiting": num_queued,
            "num_steps": c.num_steps,
            "max_seqs_in_step": c.max_seqs_in_step,
            "num_burst_waits": c.num_burst_waits,
            "num_direct_tokens": c.num_direct_tokens,
            "num_requests_finished": c.num_requests_finished,
            "num_prompt_tokens": c.num_prompt_tokens,
            "num_cached_prompt_tokens": c.num_cached_prompt_tokens,
            "num_shared_prompt_tokens": c.num_shared_prompt_tokens,
            "num_generated_tokens": c.num_generated_tokens,
            "num_decode_errors": c.num_decode_errors,
            "kv_capacity_tokens": self.ctx_size * self.parallel,
            "kv_used_tokens": kv_used,
            "kv_cached_tokens": kv_cached,
            "prompt_cache": self._host_cache_stats(),
            "tokenizer_cache": self.runner.piece_cache_stats(),  # chat prompts' pieces (piece_cache.py)
        }

    def _host_cache_stats(self) -> dict | None:
        cache = self.host_cache
        if cache is None:
            return None
        return {
            "limit_bytes": cache.limit_bytes, "bytes": cache.num_bytes, "entries": len(cache),
            "tokens": cache.num_tokens, "num_saved": cache.stats.num_saved, "num_restored": cache.stats.num_restored,
            "num_restored_tokens": cache.stats.num_restored_tokens, "num_evicted": cache.stats.num_evicted,
        }

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
        self._postbox.wait_s = 0  # the loop may be the one waiting for this close
        self._hand_over()
        self.runner.close()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        if self.runner.cpus:
            # The engine thread is llama.cpp's thread 0 (ggml pins it too, but only when it decodes with more than
            # one thread); sampling and bookkeeping then stay on its CPU as well.
            os.sched_setaffinity(0, {self.runner.cpus[0]})
        while True:
            self._wake.clear()  # before draining: a submit after the drain sets it again
            self._drain_inbox()
            self._hand_over()  # aborted requests' final deltas
            if self._stopping:
                return
            if not self.scheduler.has_work():
                if self._save_an_idle_slot():
                    continue  # one at a time: work that arrives meanwhile waits for one save at most
                self._idle = True
                self.quiet.set()
                self._wake.wait()
                self.quiet.clear()
                continue
            if self._idle:
                self._idle = False
                self._gather_burst()
            try:
                self.step()
            except Exception:  # never let one bad step kill the engine for everyone
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, RequestStatus.FINISHED_ERROR, error="internal engine error", keep_cache=False)
            finally:
                self._hand_over()

    def _save_an_idle_slot(self) -> bool:
        """While there is nothing to decode: save one finished slot's KV to the host cache, if it is worth keeping
        and not there yet. False when there is none left to save.

        Why: a slot is saved before a new request overwrites it (_swap_cached_kv), and that save, ~1.5 ms a slot
        here (fresh memory, page faults), was on the new request's path: at a burst of 8 requests, ~12 ms of each
        one's time to first token. Done while idle, the admission finds the tokens covered and saves nothing."""
        cache = self.host_cache
        if cache is None:
            return False
        for slot in self.scheduler.slots:
            tokens = slot.cached_tokens
            if not slot.is_free or len(tokens) < IDLE_SAVE_MIN_TOKENS or self._idle_saved.get(slot.seq_id) == (
                    slot.last_used_step, len(tokens)):
                continue
            self._idle_saved[slot.seq_id] = (slot.last_used_step, len(tokens))  # tried once, whatever comes of it
            if cache.covers(tokens):
                continue
            self._save_to_host_cache(slot.seq_id, list(tokens))
            return True
        return False

    def _save_to_host_cache(self, seq_id: int, tokens: list[int]) -> None:
        try:
            self.host_cache.add(tokens, self.runner.save_state(seq_id))
        except (DecodeError, MemoryError) as exc:  # the cache is an optimisation: never fail a request for it
            log.warning("could not save sequence %d to the prompt cache: %s", seq_id, exc)

    def _gather_burst(self) -> None:
        """The engine was idle and work arrived: wait while more requests keep arriving (each within gather_s of
        the last, gather_max_s in all) before the first step. With `arrivals`, wait only while the server holds a
        request that has not reached the engine yet: a lone request starts at once, a burst as soon as its last
        request is in.

        Why: clients often start together (8 users, a load test), but the HTTP side submits them one by one, a
        few ms apart (parsing, templating, tokenizing in Python). Without the wait the first request decodes
        alone and the others join at the next step, a whole step (~100 ms at 8 streams here) later. Measured on
        the 2-core VM, 8 streams, 8 interleaved rounds: time to first token p50 187 → 169 ms, throughput
        unchanged. Without `arrivals` (in-process use) a lone request pays gather_s once."""
        if self.gather_s <= 0:
            return
        arrivals = self.arrivals
        deadline = time.monotonic() + self.gather_max_s
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            if arrivals is not None and arrivals.pending <= 0:
                # None on its way. A submit puts its request in the inbox before it leaves the count: take them.
                self._drain_inbox()
                return
            self.counters.num_burst_waits += 1
            if not self._wake.wait(min(self.gather_s, left)):
                return  # nothing more arrived: the burst is over
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "submit":
                request, collector = payload
                seq = Sequence(request=request, state=_SequenceState(collector=collector))
                self.scheduler.add(seq)
            else:
                seq = self.scheduler.find(payload)
                if seq is not None:
                    self._finish(seq, RequestStatus.FINISHED_ABORTED)

    def step(self) -> None:
        plan = self.scheduler.schedule()
        if plan.admissions:
            with self._lock:
                self._num_queued -= len(plan.admissions)
                for admission in plan.admissions:
                    admission.sequence.request.started = True
        for admission in plan.admissions:
            try:
                self._start(admission)
            except ValueError as exc:  # this request's grammar: fail it alone, and nothing of it was computed
                admission.sequence.request.started = False
                self._finish(admission.sequence, RequestStatus.FINISHED_ERROR, error=str(exc))
        # A chunk goes only where its sequence's KV ends: a failed start drops the sequence (finished), and a KV
        # copy that could not be made sends it back to position 0 (forget_reuse), to be planned from there next step.
        chunks = [c for c in plan.chunks if not c.sequence.status.is_finished and c.start == c.sequence.num_computed]
        if not chunks:
            return
        try:
            rows = self.runner.decode([
                BatchEntry(c.sequence.slot.seq_id, c.tokens, c.start, c.want_logits, self._scores_prompt(c))
                for c in chunks
            ])
        except DecodeError as exc:
            self._fail_plan(plan, str(exc))
            return
        self.counters.num_steps += 1
        self.counters.max_seqs_in_step = max(self.counters.max_seqs_in_step, len(chunks))
        for chunk, row in zip(chunks, rows):
            seq = chunk.sequence
            if self._scores_prompt(chunk):
                self._score_prompt(seq, chunk, row)
                if not chunk.want_logits:
                    row = -1
            if row < 0:
                self.scheduler.commit(chunk, None)
                continue
            self._advance(seq, chunk, row)

    def _advance(self, seq: Sequence, chunk: ScheduledChunk, row: int) -> None:
        """Sample the next token (or take the engine's own: a forced `</think>`), then post-process it and any
        tokens forced after it. Forced tokens are appended to the sequence and fed by the next step."""
        state: _SequenceState = seq.state
        if seq.request.sampling.max_tokens == 0:  # the prompt only (llama.vim's cache warm-up): nothing sampled
            self.scheduler.commit(chunk, None)
            self._finish(seq, RequestStatus.FINISHED_LENGTH)
            return
        forced = self._forced_tokens(seq)
        logprob = None
        is_forced = bool(forced)
        if is_forced:
            token = forced.pop(0)
            self.runner.accept(state.sampler, token)
        else:
            grammar = state.grammar if state.grammar is not None and self._answering(state) else None
            try:
                token = self.runner.sample(state.sampler, row, grammar)
            except DecodeError as exc:
                self.scheduler.commit(chunk, None)
                self._finish(seq, RequestStatus.FINISHED_ERROR, error=str(exc))
                return
            if self._ends_inside_reasoning(state, token):
                # The model stopped while thinking, but the request owes an answer in its response_format:
                # close the block for it (as a spent budget does) and let the grammar shape the answer.
                state.close_forced = True
                forced = list(self._close_tokens)
                token = forced.pop(0)
                is_forced = True
            elif seq.request.sampling.logprobs:
                logprob = self._logprob(seq, row, token)
        self.scheduler.commit(chunk, token)
        finished = self._postprocess(seq, token, logprob, forced=is_forced)
        while not finished:
            if not forced:
                forced = self._forced_tokens(seq)
                if not forced:
                    return
            token = forced.pop(0)
            self.runner.accept(state.sampler, token)
            seq.force([token])
            finished = self._postprocess(seq, token, None, forced=True)

    def _ends_inside_reasoning(self, state: _SequenceState, token: int) -> bool:
        return (state.grammar is not None and state.reasoning is not None and state.reasoning.parser.in_reasoning
                and not state.close_forced and self.runner.is_eog(token))

    @staticmethod
    def _answering(state: _SequenceState) -> bool:
        return state.reasoning is None or state.reasoning.parser.answering

    def _forced_tokens(self, seq: Sequence) -> list[int]:
        """The tokens that close the reasoning, once its budget is spent (only once per sequence)."""
        state: _SequenceState = seq.state
        params = seq.request.sampling.reasoning
        shaper = state.reasoning
        if (shaper is None or params is None or params.budget is None or state.close_forced
                or not shaper.parser.in_reasoning or state.num_reasoning_tokens < params.budget):
            return []
        state.close_forced = True
        return list(self._close_tokens)

    def _start(self, admission: Admission) -> None:
        seq, seq_id = admission.sequence, admission.seq_id
        self._swap_cached_kv(admission)
        state: _SequenceState = seq.state
        params = seq.request.sampling
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        state.sampler = self.runner.new_sampler(params, seed, seq.prompt_tokens)
        state.stop = StopStringMatcher(params.stop)
        if params.n_indent or params.t_max_predict_ms:
            state.editor = EditorStops(params.n_indent, params.t_max_predict_ms)
        if params.reasoning is not None:
            prefix = params.reasoning.opened or prompt_reasoning_prefix(self._prompt_tail(seq.prompt_tokens))
            if params.reasoning.enabled or prefix is not None:
                state.reasoning = ReasoningShaper(params.reasoning.format, starts_in_reasoning=prefix is not None,
                                                  raw_prefix=prefix or "")
        if params.tool_format is not None:
            # With a grammar too, the answer is a forced call (response_format and forced calls never combine).
            state.tools = ToolCallParser(params.tool_format, forced=params.grammar is not None)
            state.special_pieces = True
        self.runner.keep_prefix(seq_id, seq.num_computed)
        self.counters.num_prompt_tokens += len(seq.prompt_tokens)
        self.counters.num_cached_prompt_tokens += seq.num_computed
        if params.grammar is not None:
            state.grammar = self.runner.new_grammar(params.grammar.gbnf, params.grammar.root)  # ValueError: bad

    def _swap_cached_kv(self, admission: Admission) -> None:
        """Before the slot is reused: save its KV to the host cache, then copy in the KV the scheduler chose (a
        saved state, or a busy slot's). KV that cannot be copied (a unified KV pool that is full) only costs
        the reuse: the prompt is computed."""
        cache, seq_id = self.host_cache, admission.seq_id
        if admission.save is not None and cache is not None:
            self._save_to_host_cache(seq_id, admission.save)
        if admission.restore is None and admission.copy_from is None:
            return
        try:
            state = admission.restore.state if admission.restore is not None else self.runner.save_state(
                admission.copy_from)
            copied = self.runner.load_state(seq_id, state)
        except (DecodeError, MemoryError):
            copied = False
        # The copy must hold every position the sequence skips (the source may have been trimmed this step).
        if copied and self.runner.num_positions(seq_id) >= admission.num_reused:
            if admission.restore is not None and cache is not None:
                cache.touch(admission.restore, admission.num_reused)
            else:
                self.counters.num_shared_prompt_tokens += admission.num_reused
        else:
            log.warning("could not copy %d cached tokens into sequence %d", admission.num_reused, seq_id)
            self.scheduler.forget_reuse(admission.sequence)

    def _prompt_tail(self, prompt_tokens: list[int], num_tokens: int = 32) -> str:
        """The end of the prompt as text, special tokens included (where a template may have opened <think>)."""
        pieces = b"".join(self.runner.token_piece(t, special=True) for t in prompt_tokens[-num_tokens:])
        return pieces.decode("utf-8", errors="replace")

    @staticmethod
    def _scores_prompt(chunk: ScheduledChunk) -> bool:
        """A prefill chunk of a request that wants its prompt's logprobs: every token's logits are kept."""
        seq = chunk.sequence
        return seq.request.sampling.prompt_logprobs is not None and chunk.start < len(seq.prompt_tokens)

    def _score_prompt(self, seq: Sequence, chunk: ScheduledChunk, last_row: int) -> None:
        """The logprob of each prompt token after this chunk's positions (logits row i scores token i + 1);
        the prompt's first token has none (as vLLM and OpenAI's echo report it)."""
        state: _SequenceState = seq.state
        prompt, num_top = seq.prompt_tokens, seq.request.sampling.prompt_logprobs or 0
        if chunk.start == 0:
            state.prompt_logprobs.append(self._token_logprob(prompt[0], None, []))
        first_row = last_row - len(chunk.tokens) + 1
        # Row k scores the token after position start + k; the last prompt position's row picks the first output.
        scored = prompt[chunk.start + 1: chunk.start + len(chunk.tokens) + 1]
        if not scored:
            return
        for token, (chosen, top) in zip(scored, self.runner.logprobs_of_rows(first_row, scored, num_top)):
            state.prompt_logprobs.append(self._token_logprob(token, chosen, top))

    def _logprob(self, seq: Sequence, row: int, token: int) -> TokenLogprob:
        return self._token_logprob(token, *self.runner.logprobs(row, token, seq.request.sampling.top_logprobs))

    def _token_logprob(self, token: int, logprob: float | None, top: list[tuple[int, float]]) -> TokenLogprob:
        piece = self.runner.token_piece
        return TokenLogprob(
            token=piece(token).decode("utf-8", errors="replace"),
            token_bytes=piece(token),
            logprob=logprob,
            top=[(piece(t).decode("utf-8", errors="replace"), piece(t), lp) for t, lp in top],
            token_id=token,
            top_ids=[t for t, _ in top],
        )

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None, *, forced: bool = False) -> bool:
        """Turn one output token into a delta (reasoning, content, tool calls; stop strings and max_tokens).
        Returns True when the sequence finished."""
        state: _SequenceState = seq.state
        params = seq.request.sampling
        self.counters.num_generated_tokens += 1
        delta = TokenDelta(token_ids=[token], logprobs=[logprob] if logprob else [])
        if state.prompt_logprobs:
            delta.prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, []
        status: RequestStatus | None = None
        eog = self.runner.is_eog(token)
        # A finished grammar allows nothing but end-of-generation: stop even under ignore_eos.
        if eog and (not params.ignore_eos or (state.grammar is not None and self._answering(state))):
            status = RequestStatus.FINISHED_STOPPED
        elif not eog:
            piece = self.runner.token_piece(token, special=state.special_pieces)
            was_reasoning = state.reasoning is not None and state.reasoning.parser.in_reasoning
            self._emit(state, delta, state.decoder.decode(piece))
            if was_reasoning and state.reasoning.parser.in_reasoning and not forced:
                state.num_reasoning_tokens += 1
            if delta.stop_reason is not None:
                status = RequestStatus.FINISHED_STOPPED
            elif state.editor is not None and self._editor_stops(state, delta):
                status = RequestStatus.FINISHED_LENGTH  # llama-server's stop_type "limit"
        if status is None and len(seq.output_tokens) >= params.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            if state.collector.may_go_direct(delta):
                self._direct.append((state.collector, delta))
            else:
                self._post(state.collector, delta)
            return False
        if delta.stop_reason is None and not (state.editor is not None and state.editor.stopped):
            # Not cut by a stop string or an editor stop: release what was held back.
            # Bytes still buffered are a character the output was cut inside: dropped, as llama-server does,
            # rather than sent as U+FFFD, a character the model never wrote.
            state.decoder.reset()
            self._emit(state, delta, "", final=True)
        if status == RequestStatus.FINISHED_STOPPED and state.num_tool_calls:
            delta.finish_reason = FinishReason.TOOL_CALLS
        self._finish(seq, status, delta=delta)
        return True

    @staticmethod
    def _editor_stops(state: _SequenceState, delta: TokenDelta) -> bool:
        now = time.perf_counter()
        if state.first_token_at is None:
            state.first_token_at = now
        delta.text, stop = state.editor.feed(delta.text, now - state.first_token_at)
        return stop

    def _emit(self, state: _SequenceState, delta: TokenDelta, text: str, *, final: bool = False) -> None:
        """Text → reasoning (shaped per the request's style) → content → tool calls → stop strings → delta."""
        shown = ""
        content = text
        if state.reasoning is not None:
            reasoning, shown, content = state.reasoning.feed(text)
            if final:
                more_reasoning, more_shown, more_content = state.reasoning.flush()
                reasoning += more_reasoning
                shown += more_shown
                content += more_content
            delta.reasoning_text += reasoning
        if state.tools is not None:
            content, calls = state.tools.feed(content)
            if final:
                rest, more_calls = state.tools.flush()
                content += rest
                calls += more_calls
            delta.tool_calls.extend(calls)
            state.num_tool_calls += len(calls)
        visible, stop_reason = state.stop.feed(content)
        if final and stop_reason is None:
            visible += state.stop.flush()
        delta.text += shown + visible
        if stop_reason is not None:
            delta.stop_reason = stop_reason

    def _finish(
        self,
        seq: Sequence,
        status: RequestStatus,
        *,
        delta: TokenDelta | None = None,
        error: str | None = None,
        keep_cache: bool = True,
    ) -> None:
        was_waiting = seq.status == RequestStatus.WAITING
        self.scheduler.finish(seq, status, keep_cache=keep_cache)
        if was_waiting:
            with self._lock:
                self._num_queued -= 1
        state: _SequenceState = seq.state
        if state.sampler is not None:
            self.runner.free_sampler(state.sampler)
            state.sampler = None
        if state.grammar is not None:
            self.runner.free_sampler(state.grammar)
            state.grammar = None
        delta = delta or TokenDelta()
        if delta.finish_reason is None or status != RequestStatus.FINISHED_STOPPED:
            delta.finish_reason = status.finish_reason
        delta.error = error
        delta.num_prompt_tokens = len(seq.prompt_tokens)
        delta.num_cached_tokens = seq.num_cached
        delta.num_generated_tokens = len(seq.output_tokens)
        delta.num_reasoning_tokens = state.num_reasoning_tokens
        self.counters.num_requests_finished += 1
        self._post(state.collector, delta)

    def _post(self, collector: RequestCollector, delta: TokenDelta) -> None:
        """A delta for the event loop: after any direct write of this step (one may be of the same request)."""
        if self._direct:
            self._write_direct()
        self._postbox.put(collector, delta)

    def _write_direct(self) -> None:
        pending, self._direct = self._direct, []
        for collector, delta in pending:
            if collector.direct.send_text(delta.text, len(delta.token_ids)):
                self.counters.num_direct_tokens += 1
            else:  # closed (the client left) or broken (it does not keep up): the loop's way
                self._postbox.put(collector, delta)

    def _hand_over(self) -> None:
        """The step's deltas to their clients: the direct writes, then the event loop's share."""
        if self._direct:
            self._write_direct()
        self._postbox.flush()

    def _fail_plan(self, plan: StepPlan, message: str) -> None:
        """A failed llama_decode: fail the sequences in it, drop their KV, keep the engine alive."""
        self.counters.num_decode_errors += 1
        log.error("decode failed: %s", message)
        for chunk in plan.chunks:
            seq = chunk.sequence
            if seq.status.is_finished:
                continue
            seq_id = seq.slot.seq_id
            self._finish(seq, RequestStatus.FINISHED_ERROR, error=message, keep_cache=False)
            try:
                self.runner.keep_prefix(seq_id, 0)
            except DecodeError:
                pass

