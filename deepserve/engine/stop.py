"""Stop strings over a stream of text pieces.

A stop string may arrive split across several tokens, so text that could be the start of a stop string
is held back until it is known not to be one. No part of a stop string is ever emitted.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add a piece of text; return (text safe to emit now, the stop string if one matched)."""
        if not self._stop:
            return piece, None
        text = self._held + piece
        first_hit: tuple[int, str] | None = None
        for stop in self._stop:
            at = text.find(stop)
            if at != -1 and (first_hit is None or at < first_hit[0]):
                first_hit = (at, stop)
        if first_hit is not None:
            self._held = ""
            return text[: first_hit[0]], first_hit[1]
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Text held back at the end of generation (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
