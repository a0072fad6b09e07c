"""Continuous-batching scheduler. Plain Python: no llama_cpp import, so it is unit-tested directly.

One call to `schedule()` plans one engine step:
1. every sequence that is decoding contributes its pending output tokens: the one just sampled, plus any
   the engine appended itself (a forced `</think>`);
2. sequences still prefilling get prompt chunks from what is left of the token budget (chunked prefill:
   a long prompt is spread over several steps instead of freezing everyone else);
3. waiting requests are admitted into free slots, preferring the slot whose cached KV shares the
   longest prefix with the prompt (prompt cache, like llama.cpp's server), and start prefilling at once.
   With a host-memory cache (`prompt_cache.HostPromptCache`), a slot's KV that a new request is about to
   overwrite is saved there first, and a saved state that shares a longer prefix than any free slot is
   copied back into one. A busy slot's KV is copied the same way: requests that share a prompt (a burst of
   identical ones, `n` > 1, a common system prompt) compute it once. A request whose prefix another one is
   still prefilling waits for it (a step or so) instead of computing it alongside.

After the runner has decoded the step, `commit()` advances each scheduled sequence.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from deepserve.engine.prompt_cache import HostPromptCache, SavedPrompt, common_prefix_length
from deepserve.engine.types import GenerateRequest, RequestStatus

# A slot's KV is saved to the host cache before it is overwritten when the new request keeps less than half of
# it, or loses at least this many tokens (llama.cpp's server saves when it keeps less than half).
SAVE_MIN_LOST_TOKENS = 64
# A request waits for another's prefill when that will let it reuse at least this many more tokens than it can
# now: waiting costs it about one step; computing the tokens alongside costs every sequence in the step.
WAIT_MIN_GAIN_TOKENS = 16
# A saved or busy slot's KV is copied whole; it is only copied when the request reuses at least this share of it
# (llama.cpp's server: "don't trash large prompts", f_keep >= 0.25).
COPY_MIN_SHARE = 0.25
PROMPT_SCORING_CHUNK = 64  # prompt tokens a step for a request that wants its prompt's logprobs


@dataclass(slots=True, eq=False)
class Slot:
    """One llama.cpp sequence id and the tokens whose KV it currently holds."""

    seq_id: int
    cached_tokens: list[int] = field(default_factory=list)
    sequence: Sequence | None = None
    last_used_step: int = -1

    @property
    def is_free(self) -> bool:
        return self.sequence is None


@dataclass(slots=True, eq=False)
class Sequence:
    request: GenerateRequest
    status: RequestStatus = RequestStatus.WAITING
    slot: Slot | None = None
    output_tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens (prompt, then output) whose KV is in the slot
    num_cached: int = 0  # prompt tokens reused from the prompt cache
    state: Any = None  # engine-side state: sampler, detokenizer, collector

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> list[int]:
        return self.request.prompt_tokens

    def force(self, tokens: list[int]) -> None:
        """Append output tokens the engine chose itself; the next steps feed them before sampling again."""
        self.output_tokens.extend(tokens)

    def token_at(self, index: int) -> int:
        num_prompt = len(self.request.prompt_tokens)
        return self.request.prompt_tokens[index] if index < num_prompt else self.output_tokens[index - num_prompt]

    def tokens_between(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.request.prompt_tokens)
        if end <= num_prompt:
            return self.request.prompt_tokens[start:end]
        return (self.request.prompt_tokens + self.output_tokens)[start:end]


@dataclass(slots=True)
class ScheduledChunk:
    sequence: Sequence
    start: int  # first token index (= KV position)
    tokens: list[int]
    want_logits: bool  # the chunk reaches the end of what is known: sample after it


@dataclass(slots=True)
class Admission:
    """A waiting request placed in a slot. The engine first saves the slot's KV to the host cache (`save`: the
    tokens it holds), then copies `restore`'s state into the slot, then drops the KV beyond `num_reused`."""

    sequence: Sequence
    seq_id: int
    num_reused: int
    save: list[int] | None = None
    restore: SavedPrompt | None = None
    copy_from: int | None = None  # a busy slot's seq id: copy its KV in (instead of restore)


@dataclass(slots=True)
class _Placement:
    slot: Slot
    num_reused: int
    restore: SavedPrompt | None = None
    copy_from: Slot | None = None


_WAIT = object()  # _place's answer when the request should wait for another's prefill


@dataclass(slots=True)
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, num_slots: int, token_budget: int, host_cache: HostPromptCache | None = None):
        if token_budget < num_slots:
            raise ValueError("the token budget (n_batch) must be at least the number of slots")
        self.slots = [Slot(seq_id=i) for i in range(num_slots)]
        self.token_budget = token_budget
        self.host_cache = host_cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self._step = 0

    # ---- queue -------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    # ---- planning ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step += 1
        plan = StepPlan()
        budget = self.token_budget
        decoding = [seq for seq in self.running if seq.status == RequestStatus.DECODE]
        for i, seq in enumerate(decoding):
            # Every output token not yet in the KV: usually the one just sampled, but the engine may have
            # appended tokens of its own after it (a forced `</think>`). Each decoder keeps at least one
            # token of the budget for every decoder after it; what does not fit waits for the next step.
            pending = seq.output_tokens[seq.num_computed - len(seq.prompt_tokens):]
            take = min(len(pending), budget - (len(decoding) - i - 1))
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, pending[:take], take == len(pending)))
            budget -= take
        for seq in self.running:
            if seq.status == RequestStatus.PREFILL and budget > 0:
                budget -= self._plan_prefill(seq, budget, plan)
        held: list[Sequence] = []
        while self.waiting and budget > 0:
            head = self.waiting[0]
            placement = self._place(head.prompt_tokens, reuse=head.request.sampling.prompt_logprobs is None)
            if placement is None:
                break
            seq = self.waiting.popleft()
            if placement is _WAIT:
                held.append(seq)  # the ones behind it may go ahead
                continue
            plan.admissions.append(self._admit(seq, placement))
            budget -= self._plan_prefill(seq, budget, plan)
        self.waiting.extendleft(reversed(held))
        return plan

    def _plan_prefill(self, seq: Sequence, budget: int, plan: StepPlan) -> int:
        num_prompt = len(seq.prompt_tokens)
        if seq.request.sampling.prompt_logprobs is not None:
            # Every row of a scored chunk is kept and scored on the engine thread: small chunks bound both the
            # stall of the step (the others wait) and llama.cpp's logits buffer (rows x vocabulary, never shrunk).
            budget = min(budget, PROMPT_SCORING_CHUNK)
        end = min(num_prompt, seq.num_computed + budget)
        tokens = seq.prompt_tokens[seq.num_computed : end]
        plan.chunks.append(ScheduledChunk(seq, seq.num_computed, tokens, end == num_prompt))
        return len(tokens)

    def _place(self, prompt: list[int], reuse: bool = True) -> _Placement | object | None:
        """Where a prompt goes: a free slot, and the KV to copy into it first (a saved state or a busy slot's),
        whichever lets it reuse the most; _WAIT to wait for a prefill in progress; None if no slot is free.
        `reuse` False: computed from its first token (its prompt logprobs need every position's logits)."""
        free = [slot for slot in self.slots if slot.is_free]
        if not free:
            return None
        if not reuse:
            return _Placement(max(free, key=lambda s: (self._busy_neighbours(s), not s.cached_tokens,
                                                       -s.last_used_step)), 0)
        # Longest shared prefix first; among equals one next to busy slots, so that they stay consecutive
        # (llama.cpp decodes each run of consecutive sequence ids as a separate pass over the weights:
        # runner.decode says why); then the least recently used, to keep hot caches.
        best = max(free, key=lambda s: (common_prefix_length(s.cached_tokens, prompt), self._busy_neighbours(s),
                                        -s.last_used_step))
        in_place = _reusable(common_prefix_length(best.cached_tokens, prompt), prompt)
        copy_reuse, restore, copy_from = 0, None, None
        if self.host_cache is not None:
            saved, shared = self.host_cache.best(prompt)
            if saved is not None and _worth_copying(shared, len(saved.tokens)):
                copy_reuse, restore = _reusable(shared, prompt), saved
        pending = 0
        for seq in self.running:
            held = seq.slot.cached_tokens
            shared = common_prefix_length(held, prompt)
            if _reusable(shared, prompt) > copy_reuse and _worth_copying(shared, len(held)):
                copy_reuse, restore, copy_from = _reusable(shared, prompt), None, seq.slot
            if seq.status == RequestStatus.PREFILL:  # what its slot will hold once the prefill is done
                shared = common_prefix_length(seq.prompt_tokens, prompt)
                if _worth_copying(shared, len(seq.prompt_tokens)):
                    pending = max(pending, _reusable(shared, prompt))
        if pending - max(in_place, copy_reuse) >= WAIT_MIN_GAIN_TOKENS:
            return _WAIT
        if copy_reuse > in_place:
            # The slot's own KV will be replaced: next to busy slots, then an empty one, then the least recently used.
            victim = max(free, key=lambda s: (self._busy_neighbours(s), not s.cached_tokens, -s.last_used_step))
            return _Placement(victim, copy_reuse, restore=restore, copy_from=copy_from)
        return _Placement(best, in_place)

    def _busy_neighbours(self, slot: Slot) -> int:
        """How many of the slots with the sequence ids next to this one's are busy (0, 1 or 2)."""
        return sum(0 <= i < len(self.slots) and not self.slots[i].is_free for i in (slot.seq_id - 1, slot.seq_id + 1))

    def _admit(self, seq: Sequence, placement: _Placement) -> Admission:
        slot, num_reused = placement.slot, placement.num_reused
        old = slot.cached_tokens
        if placement.restore is not None:
            cached, num_kept = placement.restore.tokens[:num_reused], 0
        elif placement.copy_from is not None:
            cached, num_kept = placement.copy_from.cached_tokens[:num_reused], 0
        else:
            cached, num_kept = old[:num_reused], num_reused
        num_lost = len(old) - num_kept
        save = None
        if (self.host_cache is not None and num_lost > 0
                and (2 * num_kept < len(old) or num_lost >= SAVE_MIN_LOST_TOKENS)
                and not self.host_cache.covers(old)):
            save = old
        slot.sequence = seq
        slot.cached_tokens = list(cached)
        slot.last_used_step = self._step
        seq.slot = slot
        seq.num_computed = num_reused
        seq.num_cached = num_reused
        seq.status = RequestStatus.PREFILL
        self.running.append(seq)
        copy_from = placement.copy_from.seq_id if placement.copy_from is not None else None
        return Admission(seq, slot.seq_id, num_reused, save=save, restore=placement.restore, copy_from=copy_from)

    def forget_reuse(self, seq: Sequence) -> None:
        """The slot's KV could not be restored: the admitted sequence computes its whole prompt, from the next
        step (this step's chunk for it started past what its KV holds, and the engine drops it)."""
        seq.num_computed = 0
        seq.num_cached = 0
        if seq.slot is not None:
            seq.slot.cached_tokens = []

    # ---- after the step ----------------------------------------------------------------------
    def commit(self, chunk: ScheduledChunk, sampled_token: int | None) -> None:
        """The chunk's tokens are now in the KV cache; `sampled_token` is what its logits gave (or the token
        the engine put in its place). More output tokens may be appended after it (`Sequence.force`)."""
        seq = chunk.sequence
        seq.num_computed = chunk.start + len(chunk.tokens)
        if seq.slot is not None:
            seq.slot.cached_tokens.extend(chunk.tokens)
            seq.slot.last_used_step = self._step
        if sampled_token is not None:
            seq.output_tokens.append(sampled_token)
            seq.status = RequestStatus.DECODE

    def finish(self, seq: Sequence, status: RequestStatus, *, keep_cache: bool = True) -> None:
        """End a sequence (waiting or running). Its slot keeps the KV for prompt-cache reuse."""
        assert status.is_finished
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        slot = seq.slot
        if slot is not None:
            slot.sequence = None
            if not keep_cache:
                slot.cached_tokens = []
            seq.slot = None


def _reusable(num_shared: int, prompt: list[int]) -> int:
    """Prompt tokens whose KV can be reused: at least the last one is recomputed (its logits are sampled)."""
    return max(min(num_shared, len(prompt) - 1), 0)


def _worth_copying(num_shared: int, num_held: int) -> bool:
    return num_shared > 0 and num_shared >= COPY_MIN_SHARE * num_held
