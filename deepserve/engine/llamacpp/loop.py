"""LlamaCppEngine: one thread that repeats `step()` = schedule → run → postprocess.

The HTTP side talks to it through a locked inbox (submit / abort) and per-request collectors.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from deepserve.engine.collector import RequestCollector
from deepserve.engine.llamacpp.runner import BatchEntry, DecodeError, LlamaRunner
from deepserve.engine.llamacpp.scheduler import Scheduler, Sequence, StepPlan
from deepserve.engine.stop import StopStringMatcher
from deepserve.engine.types import (
    GenerateRequest,
    RequestStatus,
    TokenDelta,
    TokenLogprob,
)
from deepserve.errors import ContextLengthError, InvalidRequestError, QueueFullError, ServiceUnavailableError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SequenceState:
    collector: RequestCollector
    sampler: int | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stop: StopStringMatcher | None = None


@dataclass(slots=True)
class EngineCounters:
    num_steps: int = 0
    max_seqs_in_step: int = 0  # most sequences ever decoded together in one llama_decode
    num_requests_finished: int = 0
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_decode_errors: int = 0


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
        max_queue: int = 64,
        kv_unified: bool = False,
        poll: int | None = 0,
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
        )
        self.scheduler = Scheduler(parallel, batch_size)
        self.counters = EngineCounters()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, object]] = []
        self._num_queued = 0  # submitted and not yet admitted to a slot
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="deepserve-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side -----------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.runner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise InvalidRequestError("The prompt is empty.", param="messages")
        if num_prompt_tokens + max_tokens > self.ctx_size:
            raise ContextLengthError(
                f"This model's maximum context length is {self.ctx_size} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )

    def submit(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.check_fits(len(request.prompt_tokens), request.sampling.max_tokens)
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
            self._inbox.append(("submit", (request, collector)))
        self._wake.set()
        return self._stream(request.request_id, collector)

    async def _stream(self, request_id: str, collector: RequestCollector) -> AsyncIterator[TokenDelta]:
        finished = False
        try:
            async for delta in collector:
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            num_queued = self._num_queued
        c = self.counters
        return {
            "model": self.model_id,
            "parallel": self.parallel,
            "ctx_size": self.ctx_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": num_queued,
            "num_steps": c.num_steps,
            "max_seqs_in_step": c.max_seqs_in_step,
            "num_requests_finished": c.num_requests_finished,
            "num_prompt_tokens": c.num_prompt_tokens,
            "num_cached_prompt_tokens": c.num_cached_prompt_tokens,
            "num_generated_tokens": c.num_generated_tokens,
            "num_decode_errors": c.num_decode_errors,
        }

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, RequestStatus.FINISHED_ABORTED)
        self.runner.close()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.clear()  # before draining: a submit after the drain sets it again
            self._drain_inbox()
            if self._stopping:
                return
            if not self.scheduler.has_work():
                self._wake.wait()
                continue
            try:
                self.step()
            except Exception:  # never let one bad step kill the engine for everyone
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, RequestStatus.FINISHED_ERROR, error="internal engine error", keep_cache=False)

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
            self._start(admission.sequence, admission.seq_id, admission.num_reused)
        chunks = [c for c in plan.chunks if not c.sequence.status.is_finished]
        if not chunks:
            return
        try:
            rows = self.runner.decode(
                [BatchEntry(c.sequence.slot.seq_id, c.tokens, c.start, c.want_logits) for c in chunks]
            )
        except DecodeError as exc:
            self._fail_plan(plan, str(exc))
            return
        self.counters.num_steps += 1
        self.counters.max_seqs_in_step = max(self.counters.max_seqs_in_step, len(chunks))
        for chunk, row in zip(chunks, rows):
            seq = chunk.sequence
            if row < 0:
                self.scheduler.commit(chunk, None)
                continue
            state: _SequenceState = seq.state
            token = self.runner.sample(state.sampler, row)
            logprob = self._logprob(seq, row, token) if seq.request.sampling.logprobs else None
            self.scheduler.commit(chunk, token)
            self._postprocess(seq, token, logprob)

    def _start(self, seq: Sequence, seq_id: int, num_reused: int) -> None:
        state: _SequenceState = seq.state
        params = seq.request.sampling
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        state.sampler = self.runner.new_sampler(params, seed)
        state.stop = StopStringMatcher(params.stop)
        self.runner.keep_prefix(seq_id, num_reused)
        self.counters.num_prompt_tokens += len(seq.prompt_tokens)
        self.counters.num_cached_prompt_tokens += num_reused

    def _logprob(self, seq: Sequence, row: int, token: int) -> TokenLogprob:
        piece = self.runner.token_piece
        chosen, top = self.runner.logprobs(row, token, seq.request.sampling.top_logprobs)
        return TokenLogprob(
            token=piece(token).decode("utf-8", errors="replace"),
            token_bytes=piece(token),
            logprob=chosen,
            top=[(piece(t).decode("utf-8", errors="replace"), piece(t), lp) for t, lp in top],
        )

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        state: _SequenceState = seq.state
        params = seq.request.sampling
        self.counters.num_generated_tokens += 1
        delta = TokenDelta(token_ids=[token], logprobs=[logprob] if logprob else [])
        status: RequestStatus | None = None
        if self.runner.is_eog(token) and not params.ignore_eos:
            status = RequestStatus.FINISHED_STOPPED
        else:
            text = state.decoder.decode(self.runner.token_piece(token))
            delta.text, delta.stop_reason = state.stop.feed(text)
            if delta.stop_reason is not None:
                status = RequestStatus.FINISHED_STOPPED
        if status is None and len(seq.output_tokens) >= params.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            state.collector.put(delta)
            return
        if delta.stop_reason is None:  # not cut by a stop string: release what was held back
            delta.text += state.stop.feed(state.decoder.decode(b"", final=True))[0] + state.stop.flush()
        self._finish(seq, status, delta=delta)

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
        delta = delta or TokenDelta()
        delta.finish_reason = status.finish_reason
        delta.error = error
        delta.num_prompt_tokens = len(seq.prompt_tokens)
        delta.num_cached_tokens = seq.num_cached
        delta.num_generated_tokens = len(seq.output_tokens)
        self.counters.num_requests_finished += 1
        state.collector.put(delta)

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

