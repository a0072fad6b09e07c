"""The scheduler on hand-made sequences: no llama.cpp involved."""

import pytest

from deepserve.engine.llamacpp.scheduler import Scheduler, Sequence
from deepserve.engine.types import GenerateRequest, RequestStatus, SamplingParams


def seq(prompt: list[int], request_id: str = "r") -> Sequence:
    return Sequence(GenerateRequest(prompt_tokens=prompt, sampling=SamplingParams(), request_id=request_id))


def run_step(scheduler: Scheduler, sampled: int = 99):
    """Plan a step and commit it as if the runner sampled `sampled` wherever logits were asked for."""
    plan = scheduler.schedule()
    for chunk in plan.chunks:
        scheduler.commit(chunk, sampled if chunk.want_logits else None)
    return plan


def test_admits_into_free_slots_and_prefills_whole_short_prompts():
    s = Scheduler(num_slots=2, token_budget=64)
    a, b, c = seq([1, 2, 3], "a"), seq([4, 5], "b"), seq([6], "c")
    for x in (a, b, c):
        s.add(x)
    plan = run_step(s)
    assert [ch.sequence for ch in plan.chunks] == [a, b]
    assert [ch.tokens for ch in plan.chunks] == [[1, 2, 3], [4, 5]]
    assert all(ch.want_logits for ch in plan.chunks)
    assert list(s.waiting) == [c]  # no slot left
    assert a.status == b.status == RequestStatus.DECODE
    assert a.output_tokens == [99]


def test_decoding_sequences_share_a_step_with_new_prefill():
    s = Scheduler(num_slots=3, token_budget=64)
    a = seq([1, 2, 3], "a")
    s.add(a)
    run_step(s)
    b = seq([7, 8], "b")
    s.add(b)
    plan = run_step(s, sampled=5)
    assert [(ch.sequence, ch.start, ch.tokens) for ch in plan.chunks] == [(a, 3, [99]), (b, 0, [7, 8])]
    assert a.output_tokens == [99, 5] and a.num_computed == 4


def test_long_prompt_is_chunked_by_the_budget_and_never_starves_decoders():
    s = Scheduler(num_slots=2, token_budget=8)
    a = seq([1], "a")
    s.add(a)
    run_step(s)
    long = seq(list(range(100, 120)), "long")  # 20 tokens, budget 8 with one decoder -> 7 per step
    s.add(long)
    sizes = []
    while long.status != RequestStatus.DECODE:
        plan = run_step(s)
        assert plan.chunks[0].sequence is a and plan.chunks[0].tokens == [99]  # a decodes every step
        sizes.append(len(plan.chunks[1].tokens))
        assert plan.num_tokens <= 8
    assert sizes == [7, 7, 6]
    assert long.num_computed == 20


def test_prompt_cache_reuses_the_slot_with_the_longest_shared_prefix():
    s = Scheduler(num_slots=2, token_budget=64)
    first, other = seq([1, 2, 3, 4, 5], "first"), seq([9, 9], "other")
    s.add(first)
    s.add(other)
    run_step(s)
    s.finish(first, RequestStatus.FINISHED_STOPPED)
    s.finish(other, RequestStatus.FINISHED_STOPPED)
    follow_up = seq([1, 2, 3, 4, 6, 7], "follow")
    s.add(follow_up)
    plan = s.schedule()
    (admission,) = plan.admissions
    assert admission.seq_id == first_slot_id(s, 0)
    assert admission.num_reused == 4
    assert plan.chunks[0].start == 4 and plan.chunks[0].tokens == [6, 7]
    assert follow_up.num_cached == 4


def first_slot_id(s: Scheduler, index: int) -> int:
    return s.slots[index].seq_id


def test_identical_prompt_recomputes_its_last_token_to_get_logits():
    s = Scheduler(num_slots=1, token_budget=64)
    a = seq([1, 2, 3], "a")
    s.add(a)
    run_step(s)
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    again = seq([1, 2, 3], "again")
    s.add(again)
    plan = s.schedule()
    assert plan.admissions[0].num_reused == 2
    assert plan.chunks[0].tokens == [3] and plan.chunks[0].want_logits


def test_finished_sequence_keeps_its_kv_for_reuse_unless_told_not_to():
    s = Scheduler(num_slots=1, token_budget=64)
    a = seq([1, 2], "a")
    s.add(a)
    run_step(s)
    run_step(s)  # decodes token 99 into the KV
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    assert s.slots[0].cached_tokens == [1, 2, 99] and s.slots[0].is_free
    b = seq([5], "b")
    s.add(b)
    run_step(s)
    s.finish(b, RequestStatus.FINISHED_ERROR, keep_cache=False)
    assert s.slots[0].cached_tokens == []


def test_abort_of_a_waiting_sequence_removes_it_from_the_queue():
    s = Scheduler(num_slots=1, token_budget=64)
    a, b = seq([1], "a"), seq([2], "b")
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.find("b") is b
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert s.find("b") is None and not s.waiting
    assert b.status.finish_reason.value == "abort"


def test_budget_smaller_than_slots_is_rejected():
    with pytest.raises(ValueError):
        Scheduler(num_slots=8, token_budget=4)


def test_a_decoder_feeds_every_output_token_not_yet_computed():
    """Tokens the engine appends itself (a forced `</think>`) are fed with the sampled one, in one chunk."""
    s = Scheduler(num_slots=2, token_budget=64)
    a = seq([1, 2, 3], "a")
    s.add(a)
    run_step(s, sampled=10)  # prefill; samples 10
    a.force([20, 21])  # the engine appends two tokens of its own after the sampled one
    plan = run_step(s, sampled=30)
    (chunk,) = plan.chunks
    assert (chunk.start, chunk.tokens, chunk.want_logits) == (3, [10, 20, 21], True)
    assert a.num_computed == 6 and a.output_tokens == [10, 20, 21, 30]
    plan = run_step(s)
    assert plan.chunks[0].tokens == [30] and plan.chunks[0].start == 6


def test_pending_tokens_share_the_budget_and_every_decoder_keeps_a_place():
    s = Scheduler(num_slots=3, token_budget=4)
    a, b, c = seq([1], "a"), seq([2], "b"), seq([3], "c")
    for x in (a, b, c):
        s.add(x)
    run_step(s)
    a.force([5, 6, 7, 8])  # a has 5 tokens pending; b and c one each
    plan = run_step(s, sampled=9)
    assert [(ch.sequence, ch.tokens, ch.want_logits) for ch in plan.chunks] == [
        (a, [99, 5], False), (b, [99], True), (c, [99], True)]
    assert plan.num_tokens == 4
    assert a.output_tokens == [99, 5, 6, 7, 8] and a.status == RequestStatus.DECODE  # nothing sampled for a yet
    plan = run_step(s, sampled=11)
    assert [(ch.sequence, ch.tokens, ch.want_logits) for ch in plan.chunks] == [
        (a, [6, 7], False), (b, [9], True), (c, [9], True)]
    plan = run_step(s, sampled=12)
    assert (plan.chunks[0].tokens, plan.chunks[0].want_logits) == ([8], True)
    assert a.output_tokens == [99, 5, 6, 7, 8, 12] and a.num_computed == 1 + 5


# ---- with a host-memory prompt cache -----------------------------------------------------------
def finish(s: Scheduler, x: Sequence) -> None:
    s.finish(x, RequestStatus.FINISHED_STOPPED)


def test_a_slot_about_to_lose_most_of_its_kv_is_saved_first():
    from deepserve.engine.prompt_cache import HostPromptCache

    s = Scheduler(num_slots=1, token_budget=64, host_cache=HostPromptCache(1000))
    a = seq([1, 2, 3, 4, 5, 6], "a")
    s.add(a)
    run_step(s)
    run_step(s)  # the slot now holds the prompt and the first output token
    finish(s, a)
    b = seq([1, 2, 7, 8], "b")  # keeps 2 of 7 cached tokens
    s.add(b)
    plan = s.schedule()
    [admission] = plan.admissions
    assert admission.save == [1, 2, 3, 4, 5, 6, 99] and admission.restore is None
    assert admission.num_reused == 2 and b.slot.cached_tokens == [1, 2]


def test_a_slot_that_keeps_most_of_its_kv_is_not_saved():
    from deepserve.engine.prompt_cache import HostPromptCache

    s = Scheduler(num_slots=1, token_budget=64, host_cache=HostPromptCache(1000))
    a = seq([1, 2, 3, 4, 5, 6], "a")
    s.add(a)
    run_step(s)
    finish(s, a)
    s.add(seq([1, 2, 3, 4, 5, 9], "b"))  # keeps 5 of 6
    [admission] = s.schedule().admissions
    assert admission.save is None and admission.num_reused == 5


def test_a_saved_state_sharing_more_than_any_free_slot_is_restored_into_the_lowest_free_slot():
    from deepserve.engine.prompt_cache import HostPromptCache

    cache = HostPromptCache(1000)
    cache.add([1, 2, 3, 4, 5, 6, 7], b"x" * 10)
    s = Scheduler(num_slots=3, token_budget=64, host_cache=cache)
    busy, old, recent = seq([1, 9, 9], "busy"), seq([1, 2, 8], "old"), seq([1, 2, 9], "recent")
    for x in (busy, old, recent):
        s.add(x)
    run_step(s)
    finish(s, old)
    finish(s, recent)
    c = seq([1, 2, 3, 4, 5, 0], "c")
    s.add(c)
    [admission] = s.schedule().admissions
    assert admission.restore is not None and admission.restore.tokens == [1, 2, 3, 4, 5, 6, 7]
    assert admission.seq_id == 1  # next to the busy slot 0, not slot 2
    assert admission.num_reused == 5 and c.num_cached == 5 and c.slot.cached_tokens == [1, 2, 3, 4, 5]
    assert admission.save == [1, 2, 8]  # old's KV would be replaced whole: saved first

    s.forget_reuse(c)  # the engine could not copy it back: the prompt is computed from the start
    assert c.num_computed == 0 and c.num_cached == 0 and c.slot.cached_tokens == []


def test_a_whole_prompt_in_the_cache_still_leaves_its_last_token_to_compute():
    from deepserve.engine.prompt_cache import HostPromptCache

    cache = HostPromptCache(1000)
    cache.add([1, 2, 3], b"x")
    s = Scheduler(num_slots=1, token_budget=64, host_cache=cache)
    c = seq([1, 2, 3], "c")
    s.add(c)
    plan = s.schedule()
    assert plan.admissions[0].num_reused == 2 and plan.admissions[0].restore is not None
    assert [(ch.start, ch.tokens) for ch in plan.chunks] == [(2, [3])]


# ---- sharing a prompt with a busy slot -----------------------------------------------------------
SYSTEM = list(range(1000, 1040))  # a 40-token prompt prefix many requests share


def test_a_burst_of_identical_prompts_prefills_once_and_the_rest_copy_it():
    s = Scheduler(num_slots=4, token_budget=256)
    burst = [seq(SYSTEM + [1, 2], f"r{i}") for i in range(3)]
    for x in burst:
        s.add(x)
    first = s.schedule()
    assert [a.sequence for a in first.admissions] == [burst[0]]  # the others wait for its prefill
    assert list(s.waiting) == burst[1:]
    for chunk in first.chunks:
        s.commit(chunk, 99)
    second = s.schedule()
    assert [(a.sequence, a.copy_from, a.num_reused) for a in second.admissions] == [
        (burst[1], burst[0].slot.seq_id, 41), (burst[2], burst[0].slot.seq_id, 41)]
    # the leader decodes its token; each follower computes only the last prompt token (its logits are sampled)
    assert [(c.sequence, c.start, c.tokens) for c in second.chunks] == [
        (burst[0], 42, [99]), (burst[1], 41, [2]), (burst[2], 41, [2])]
    assert burst[1].slot.cached_tokens == SYSTEM + [1]


def test_short_shared_prompts_are_computed_together_rather_than_wait():
    s = Scheduler(num_slots=4, token_budget=256)
    pair = [seq([1, 2, 3, 4, 5], "a"), seq([1, 2, 3, 4, 5], "b")]  # sharing 4 tokens is not worth a step
    for x in pair:
        s.add(x)
    assert [a.sequence for a in s.schedule().admissions] == pair


def test_a_request_waiting_for_a_prefill_lets_an_unrelated_one_go_first():
    s = Scheduler(num_slots=4, token_budget=256)
    leader, follower, other = seq(SYSTEM + [1], "leader"), seq(SYSTEM + [2], "follower"), seq([7, 8], "other")
    for x in (leader, follower, other):
        s.add(x)
    assert [a.sequence for a in s.schedule().admissions] == [leader, other]
    assert list(s.waiting) == [follower]


def test_a_prompt_sharing_a_busy_slots_prefix_copies_it_instead_of_computing_it():
    s = Scheduler(num_slots=2, token_budget=256)
    busy = seq(SYSTEM + [1, 2, 3], "busy")
    s.add(busy)
    run_step(s)
    run_step(s)  # decoding now
    newcomer = seq(SYSTEM + [4, 5], "new")
    s.add(newcomer)
    [admission] = s.schedule().admissions
    assert admission.copy_from == busy.slot.seq_id and admission.num_reused == 40
    assert newcomer.num_cached == 40 and newcomer.slot.cached_tokens == SYSTEM


def test_a_small_prefix_of_a_long_busy_history_is_not_worth_copying():
    s = Scheduler(num_slots=2, token_budget=512)
    busy = seq(SYSTEM[:20] + list(range(200)), "busy")  # 220 tokens held, a newcomer would reuse 20 (< 1/4)
    s.add(busy)
    run_step(s)
    newcomer = seq(SYSTEM[:20] + [9, 9], "new")
    s.add(newcomer)
    [admission] = s.schedule().admissions
    assert admission.copy_from is None and admission.num_reused == 0


def test_among_equally_good_slots_one_next_to_busy_ones_is_taken_so_they_stay_consecutive():
    s = Scheduler(num_slots=4, token_budget=64)
    users = [seq([1, 2, 10 + i], f"u{i}") for i in range(4)]
    for x in users:
        s.add(x)
    run_step(s)
    assert [u.slot.seq_id for u in users] == [0, 1, 2, 3]
    finish(s, users[3])
    run_step(s)
    finish(s, users[1])  # used more recently than slot 3, which least-recently-used alone would take
    newcomer = seq([1, 2, 50], "new")  # shares [1, 2] with both free slots
    s.add(newcomer)
    [admission] = s.schedule().admissions
    assert admission.seq_id == 1  # busy: 0, 1, 2 (one pass over the weights), not 0, 2, 3


def test_a_request_scoring_its_prompt_reuses_no_cached_prefix():
    s = Scheduler(num_slots=1, token_budget=64)
    first = seq([1, 2, 3, 4], "first")
    s.add(first)
    run_step(s)
    s.finish(first, RequestStatus.FINISHED_STOPPED)
    same = seq([1, 2, 3, 4, 5], "same")  # would reuse 4 tokens of the slot
    s.add(same)
    assert s.schedule().admissions[0].num_reused == 4
    s.finish(same, RequestStatus.FINISHED_STOPPED)
    scored = Sequence(GenerateRequest(prompt_tokens=[1, 2, 3, 4, 5], request_id="scored",
                                      sampling=SamplingParams(prompt_logprobs=1)))
    s.add(scored)
    plan = s.schedule()
    assert plan.admissions[0].num_reused == 0 and plan.chunks[0].start == 0 and plan.chunks[0].tokens == [1, 2, 3, 4, 5]


def test_a_prompt_being_scored_is_prefilled_in_small_chunks():
    from deepserve.engine.llamacpp.scheduler import PROMPT_SCORING_CHUNK
    s = Scheduler(num_slots=2, token_budget=512)
    scored = Sequence(GenerateRequest(prompt_tokens=list(range(1, 151)), request_id="scored",
                                      sampling=SamplingParams(prompt_logprobs=0)))
    plain = seq(list(range(500, 650)), "plain")
    s.add(scored)
    s.add(plain)
    plan = run_step(s)
    assert [len(c.tokens) for c in plan.chunks] == [PROMPT_SCORING_CHUNK, 150]
    sizes = [len(c.tokens) for c in run_step(s).chunks if c.sequence is scored]
    assert sizes == [PROMPT_SCORING_CHUNK]
