"""Host-memory prompt cache: copies of slots' KV saved before a new request overwrites them.

The slots themselves are the first prompt cache (a finished sequence's KV stays in its slot until the slot is
needed). With more users than slots, a user's conversation is pushed out of its slot by someone else's, and
its next turn would recompute the whole history. llama.cpp's server keeps such slot states in RAM
(`--cache-ram`, 8 GiB by default) and copies the best match back into a slot; so does this cache, with the
same bound. Plain Python (the state is an opaque buffer from the runner), so it is unit-tested directly; it
belongs to the engine thread.

Unlike llama-server, a restore copies the entry and leaves it in the cache (moved to most recently used):
restoring a long history to reuse a short prefix of it then loses nothing, so no "don't trash large prompts"
rule is needed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True, eq=False)
class SavedPrompt:
    tokens: list[int]  # the tokens whose KV `state` holds, from position 0
    state: Any  # the runner's serialised sequence state (a buffer with len())
    num_bytes: int
    key: int


@dataclass(slots=True)
class PromptCacheStats:
    num_saved: int = 0  # slot states copied in
    num_restored: int = 0  # states copied back into a slot
    num_restored_tokens: int = 0  # prompt tokens those restores spared the model
    num_evicted: int = 0  # entries dropped to stay within the byte limit


class HostPromptCache:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._entries: collections.OrderedDict[int, SavedPrompt] = collections.OrderedDict()  # oldest first
        self._next_key = 0
        self.num_bytes = 0
        self.num_tokens = 0
        self.stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: list[int]) -> bool:
        """Some entry already holds these tokens (they are a prefix of its tokens): saving them adds nothing."""
        return any(common_prefix_length(e.tokens, tokens) == len(tokens) for e in self._entries.values())

    def best(self, prompt: list[int]) -> tuple[SavedPrompt | None, int]:
        """The entry sharing the longest prefix with `prompt` (None if none shares a token), and that length."""
        best, best_len = None, 0
        first = prompt[0] if prompt else None
        for entry in self._entries.values():
            if not entry.tokens or entry.tokens[0] != first:
                continue
            n = common_prefix_length(entry.tokens, prompt)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def touch(self, entry: SavedPrompt, num_tokens: int) -> None:
        """The entry's first `num_tokens` were restored into a slot: it becomes the most recently used."""
        self.stats.num_restored += 1
        self.stats.num_restored_tokens += num_tokens
        if entry.key in self._entries:
            self._entries.move_to_end(entry.key)

    def add(self, tokens: list[int], state: Any) -> bool:
        """Keep a copy of a slot's state; entries it makes redundant (prefixes of `tokens`) go, then the oldest
        until the cache fits its limit. False (nothing kept) if the state alone is over the limit."""
        size = len(state)
        if not tokens or size > self.limit_bytes:
            return False
        for key in [k for k, e in self._entries.items() if common_prefix_length(e.tokens, tokens) == len(e.tokens)]:
            self._drop(key)
        while self._entries and self.num_bytes + size > self.limit_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.num_evicted += 1
        self._entries[self._next_key] = SavedPrompt(list(tokens), state, size, self._next_key)
        self._next_key += 1
        self.num_bytes += size
        self.num_tokens += len(tokens)
        self.stats.num_saved += 1
        return True

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.num_bytes -= entry.num_bytes
        self.num_tokens -= len(entry.tokens)
