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

Lookups run on the engine thread at every admission, so they must not scan every entry (a thousand saved
histories cost ~3 ms a scan in Python). Entries are indexed by chained hashes of their full blocks of BLOCK
tokens (as vLLM's prefix cache hashes KV blocks): a prompt's longest shared prefix is found by walking its own
block hashes, then refined token by token within one block on at most MAX_REFINE candidates.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
BLOCK = 16  # tokens per hashed block
MAX_REFINE = 32  # candidates compared token by token past their last shared block


def block_hashes(tokens: list[int]) -> list[int]:
    """h[d] identifies tokens[:BLOCK * (d + 1)]: each block's hash chains the previous one."""
    hashes, h = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, *tokens[start:start + BLOCK]))
        hashes.append(h)
    return hashes


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
    hashes: list[int]  # block_hashes(tokens)


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
        # block hash -> keys of the entries whose tokens start with that block chain (dicts as ordered sets)
        self._by_block: dict[int, dict[int, None]] = {}
        # hash of an entry's last full block (0: it has none) -> keys of the entries that end in that block
        self._by_last_block: dict[int, dict[int, None]] = {}
        self._next_key = 0
        self.num_bytes = 0
        self.num_tokens = 0
        self.stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: list[int]) -> bool:
        """Some entry already holds these tokens (they are a prefix of its tokens): saving them adds nothing."""
        entry, shared = self._longest(tokens, block_hashes(tokens))
        return entry is not None and shared == len(tokens)

    def best(self, prompt: list[int]) -> tuple[SavedPrompt | None, int]:
        """The entry sharing the longest prefix with `prompt` (None if none shares a token), and that length."""
        return self._longest(prompt, block_hashes(prompt))

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
        hashes = block_hashes(tokens)
        for key in self._prefixes_of(tokens, hashes):
            self._drop(key)
        while self._entries and self.num_bytes + size > self.limit_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.num_evicted += 1
        key = self._next_key
        self._next_key += 1
        self._entries[key] = SavedPrompt(list(tokens), state, size, key, hashes)
        for h in hashes:
            self._by_block.setdefault(h, {})[key] = None
        self._by_last_block.setdefault(hashes[-1] if hashes else 0, {})[key] = None
        self.num_bytes += size
        self.num_tokens += len(tokens)
        self.stats.num_saved += 1
        return True

    def _longest(self, tokens: list[int], hashes: list[int]) -> tuple[SavedPrompt | None, int]:
        depth = 0  # full blocks shared with at least one entry
        while depth < len(hashes) and hashes[depth] in self._by_block:
            depth += 1
        keys = self._by_block[hashes[depth - 1]] if depth else self._entries
        shared_blocks = depth * BLOCK
        best, best_len = None, 0
        for key in itertools.islice(reversed(keys), MAX_REFINE):  # the most recently added first
            entry = self._entries[key]
            if entry.tokens[:shared_blocks] != tokens[:shared_blocks]:
                continue  # a hash collision
            n = shared_blocks + common_prefix_length(entry.tokens[shared_blocks:shared_blocks + BLOCK],
                                                     tokens[shared_blocks:shared_blocks + BLOCK])
            if n > best_len:
                best, best_len = entry, n
                if n == min(len(tokens), shared_blocks + BLOCK):
                    break  # nothing can share more
        return best, best_len

    def _prefixes_of(self, tokens: list[int], hashes: list[int]) -> list[int]:
        """Keys of the entries whose tokens are a prefix of `tokens`."""
        found = []
        for last in [0, *hashes]:
            for key in self._by_last_block.get(last, ()):
                entry_tokens = self._entries[key].tokens
                if len(entry_tokens) <= len(tokens) and entry_tokens == tokens[:len(entry_tokens)]:
                    found.append(key)
        return found

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        for h in entry.hashes:
            keys = self._by_block[h]
            del keys[key]
            if not keys:
                del self._by_block[h]
        last = entry.hashes[-1] if entry.hashes else 0
        del self._by_last_block[last][key]
        if not self._by_last_block[last]:
            del self._by_last_block[last]
        self.num_bytes -= entry.num_bytes
        self.num_tokens -= len(entry.tokens)
