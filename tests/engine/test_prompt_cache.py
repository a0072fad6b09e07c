"""HostPromptCache on hand-made states (bytes stand in for the runner's KV copies)."""

from deepserve.engine.prompt_cache import BLOCK, HostPromptCache


def state(num_bytes: int) -> bytes:
    return bytes(num_bytes)


def test_best_is_the_entry_sharing_the_longest_prefix():
    cache = HostPromptCache(limit_bytes=1000)
    cache.add([1, 2, 3, 4], state(10))
    cache.add([1, 2, 9, 9, 9], state(10))
    cache.add([7, 8], state(10))
    entry, shared = cache.best([1, 2, 3, 5])
    assert entry.tokens == [1, 2, 3, 4] and shared == 3
    entry, shared = cache.best([1, 2, 9, 9, 9, 9])
    assert entry.tokens == [1, 2, 9, 9, 9] and shared == 5
    assert cache.best([5, 6]) == (None, 0)
    assert cache.best([]) == (None, 0)


def test_an_entry_that_is_a_prefix_of_a_new_one_is_dropped_and_covered_tokens_are_known():
    cache = HostPromptCache(limit_bytes=1000)
    cache.add([1, 2, 3], state(30))
    cache.add([1, 2, 3, 4, 5], state(50))  # a conversation's next turn: the shorter copy is redundant
    assert len(cache) == 1 and cache.num_bytes == 50 and cache.num_tokens == 5
    assert cache.covers([1, 2, 3]) and cache.covers([1, 2, 3, 4, 5])
    assert not cache.covers([1, 2, 4]) and not cache.covers([1, 2, 3, 4, 5, 6])


def test_the_least_recently_used_entries_go_first_to_stay_within_the_limit():
    cache = HostPromptCache(limit_bytes=100)
    cache.add([1], state(40))
    cache.add([2], state(40))
    cache.touch(cache.best([1])[0], 1)  # [1] restored: now the most recently used
    cache.add([3], state(40))  # 120 > 100: the oldest, [2], goes
    assert cache.best([2]) == (None, 0)
    assert cache.best([1])[1] == 1 and cache.best([3])[1] == 1
    assert cache.num_bytes == 80 and cache.stats.num_evicted == 1
    assert cache.stats.num_restored == 1 and cache.stats.num_restored_tokens == 1


def test_a_state_larger_than_the_whole_cache_is_not_kept_and_evicts_nothing():
    cache = HostPromptCache(limit_bytes=100)
    cache.add([1], state(60))
    assert cache.add([2], state(101)) is False
    assert len(cache) == 1 and cache.num_bytes == 60 and cache.stats.num_saved == 1


def brute_force_best(entries: list[list[int]], prompt: list[int]) -> int:
    def shared(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return max((shared(e, prompt) for e in entries), default=0)


def test_longest_shared_prefix_matches_a_full_scan_across_block_boundaries():
    import random
    rng = random.Random(7)
    template = [rng.randrange(100) for _ in range(BLOCK + 5)]  # every prompt starts alike, past one block
    cache, kept = HostPromptCache(limit_bytes=10**9), []
    for _ in range(25):
        base = rng.choice(kept) if kept and rng.random() < 0.5 else template
        tokens = base[:rng.randrange(len(base) + 1)] + [rng.randrange(100) for _ in range(rng.randrange(1, 60))]
        cache.add(tokens, state(1))
        kept = [e for e in kept if e != tokens[:len(e)]] + [tokens]  # what add() keeps: no entry a prefix of another
    assert sorted(map(tuple, kept)) == sorted(tuple(e.tokens) for e in cache._entries.values())
    for _ in range(200):
        base = rng.choice(kept)
        prompt = base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(100) for _ in range(rng.randrange(3))]
        entry, shared = cache.best(prompt)
        assert shared == brute_force_best(kept, prompt)
        if shared:
            assert entry.tokens[:shared] == prompt[:shared]
        assert cache.covers(prompt) == any(e[:len(prompt)] == prompt for e in kept if len(e) >= len(prompt))


def test_dropped_entries_leave_nothing_in_the_index():
    cache = HostPromptCache(limit_bytes=100)
    for i in range(50):  # each evicts the one before: a long soak of distinct multi-block prompts
        cache.add([i] * (3 * BLOCK + i), state(60))
    assert len(cache) == 1 and cache.best([49] * 200)[1] == 3 * BLOCK + 49
    assert cache.best([48] * 200) == (None, 0)
    assert sum(map(len, cache._by_block.values())) == 3 + 49 // BLOCK
    assert sum(map(len, cache._by_last_block.values())) == 1


def test_an_entry_several_blocks_long_is_dropped_when_a_longer_turn_extends_it():
    turn1 = list(range(2 * BLOCK + 3))
    turn2 = turn1 + list(range(100, 100 + BLOCK))
    cache = HostPromptCache(limit_bytes=1000)
    cache.add(turn1, state(10))
    cache.add(list(range(2 * BLOCK)) + [7], state(10))  # shares two blocks with turn1, not a prefix of turn2
    cache.add(turn2, state(10))
    assert sorted(len(e.tokens) for e in cache._entries.values()) == [2 * BLOCK + 1, len(turn2)]
    assert cache.best(turn2 + [1])[1] == len(turn2) and cache.covers(turn1)
