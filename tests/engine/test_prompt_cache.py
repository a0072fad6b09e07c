"""HostPromptCache on hand-made states (bytes stand in for the runner's KV copies)."""

from deepserve.engine.prompt_cache import HostPromptCache


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
