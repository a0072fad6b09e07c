"""Tokenizing a chat by its pieces, each piece's tokens remembered.

A chat prompt is the same pieces again and again: the system prompt, the template's markers, and in a
conversation every earlier turn, sent anew with each request. llama.cpp's tokenizer (BPE with a regex
pre-tokenizer) takes 3-6 µs a token on the 2-core VM: 0.24 ms for the benchmark's 42-token chat, 8.6 ms for a
3,000-token conversation, on the event loop or (past serving.OFFLOAD_CHARS) a worker thread, and either way CPU
taken from decoding. Tokens of a piece seen before cost a dictionary lookup.

Why the pieces' tokens are the text's tokens: with special tokens parsed, llama.cpp first cuts the text at every
special token's text (`tokenizer_st_partition`) and then tokenizes each stretch of plain text on its own. So a cut
just before a special token changes nothing, provided llama.cpp cuts there too and the pieces' edges are
treated alike, which holds for a *marker*: a special token whose text
- has no whitespace (llama.cpp's lstrip/rstrip trimming of other tokens eats only whitespace),
- is not lstrip (it would eat whitespace at the end of the piece before it, which is not in its own call),
- cannot overlap itself or a special token at least as long (those are cut out first, longest first, and one
  overlapping the marker's place would take it; choose_markers keeps clear of every special token).
The pieces are tokenized without BOS/EOS (the chat template writes its own BOS), as the whole was.
`PieceTokenizer` also compares its first results with the whole text's tokens and turns itself off at the first
difference: a guard for tokenizers that break the rule above in a way not foreseen here.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)

MAX_CACHED_BYTES = 32 * 2**20  # pieces and their tokens kept, as entry_bytes counts them
ENTRY_OVERHEAD_BYTES = 200  # an array object, an OrderedDict entry and its link
CHECKED_CALLS = 64  # first texts tokenized both ways, compared


class SpecialToken(NamedTuple):
    text: str
    lstrip: bool = False
    control: bool = True  # a control token (chat templates' markers are); else user-defined or unknown


def choose_markers(specials: Iterable[SpecialToken]) -> list[str]:
    """The special tokens a text may be cut before. `specials`: every token llama.cpp matches as special when it
    parses special tokens (control, user-defined and unknown tokens).

    Only control tokens are candidates (some vocabularies have thousands of user-defined ones; the chat markers
    are control tokens), and one that shares characters with another special token in any way is left out,
    even where a shorter one could not take its place: the test stays linear in the vocabulary's special text."""
    specials = [s for s in specials if s.text]
    joined = "\0".join(s.text for s in specials)  # NUL: not in any token's text, so no match spans two
    copies = Counter(s.text for s in specials)
    starts = {s.text[:k] for s in specials for k in range(1, len(s.text))}  # proper prefixes
    ends = {s.text[-k:] for s in specials for k in range(1, len(s.text))}  # proper suffixes
    markers = set()
    for special in specials:
        text = special.text
        if not special.control or special.lstrip or any(c.isspace() for c in text) or _self_overlaps(text):
            continue
        if joined.count(text) > copies[text]:
            continue  # inside a longer special token, which llama.cpp cuts out first
        # Not self-overlapping, so a proper prefix of it that ends a token's text ends another token's.
        if any(text[:k] in ends or text[-k:] in starts for k in range(1, len(text))):
            continue
        markers.add(text)
    return sorted(markers, key=len, reverse=True)


def _self_overlaps(text: str) -> bool:
    return any(text[:k] == text[-k:] for k in range(1, len(text)))


def entry_bytes(piece: str, num_tokens: int) -> int:
    """What keeping a piece costs: its string, its tokens (int32) and the bookkeeping around them."""
    return sys.getsizeof(piece) + 4 * num_tokens + ENTRY_OVERHEAD_BYTES


class PieceTokenizer:
    """`tokenize(text)` = `tokenize_whole(text)`, by the text's pieces between markers, each piece's tokens kept
    (least recently used dropped first, `max_bytes` in all as `entry_bytes` counts them). Thread-safe: the event
    loop and the off-loop preparation threads both tokenize."""

    def __init__(self, tokenize_whole: Callable[[str], list[int]], markers: list[str],
                 max_bytes: int = MAX_CACHED_BYTES, checked_calls: int = CHECKED_CALLS):
        self._tokenize_whole = tokenize_whole
        # Markers share no characters, so at most one matches at a place; finditer (not a split on a lookahead)
        # lets the regex engine skip to the markers' first characters: 0.09 ms for 29,000 characters and 800
        # markers.
        self._finder = re.compile("|".join(map(re.escape, markers))) if markers else None
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._num_bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._checks_left = checked_calls
        self.num_hits = 0
        self.num_misses = 0

    @property
    def enabled(self) -> bool:
        return self._finder is not None

    def stats(self) -> dict:
        """What /health shows of it."""
        with self._lock:
            return {"enabled": self._finder is not None, "pieces": len(self._pieces), "bytes": self._num_bytes,
                    "limit_bytes": self._max_bytes, "num_hits": self.num_hits, "num_misses": self.num_misses}

    def tokenize(self, text: str) -> list[int]:
        finder = self._finder  # read once: the guard may turn it off meanwhile, on another thread
        if finder is None:
            return self._tokenize_whole(text)
        tokens: list[int] = []
        start = 0
        for match in finder.finditer(text):
            if match.start() > start:
                tokens.extend(self._piece_tokens(text[start:match.start()]))
            start = match.start()
        if start < len(text):
            tokens.extend(self._piece_tokens(text[start:]))
        if self._checks_left > 0:
            self._check(text, tokens)
        return tokens

    def _piece_tokens(self, piece: str) -> array:
        with self._lock:
            cached = self._pieces.get(piece)
            if cached is not None:
                self._pieces.move_to_end(piece)
                self.num_hits += 1
                return cached
            self.num_misses += 1
        tokens = array("i", self._tokenize_whole(piece))  # outside the lock: llama_tokenize releases the GIL
        cost = entry_bytes(piece, len(tokens))
        if cost <= self._max_bytes // 4:  # one huge piece does not empty the whole cache
            with self._lock:
                if self._finder is not None and piece not in self._pieces:
                    self._pieces[piece] = tokens
                    self._num_bytes += cost
                    while self._num_bytes > self._max_bytes:
                        dropped, dropped_tokens = self._pieces.popitem(last=False)
                        self._num_bytes -= entry_bytes(dropped, len(dropped_tokens))
        return tokens

    def _check(self, text: str, tokens: list[int]) -> None:
        with self._lock:
            self._checks_left -= 1
        whole = self._tokenize_whole(text)
        if whole != tokens:
            log.warning("tokenizing by pieces differs from tokenizing the whole text for this model's vocabulary: "
                        "piece caching is off")
            with self._lock:
                self._finder = None
                self._pieces.clear()
                self._num_bytes = 0
            tokens[:] = whole
