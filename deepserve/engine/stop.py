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


class EditorStops:
    """llama-server's stops for code-editor plugins (n_indent, t_max_predict_ms), on the text as it comes.

    `n_indent`: after the first line, a line indented less than this (a blank one too) ends the answer; the text is
    cut just after that line's indentation. Every line is checked as soon as its first character that is not a
    space or a tab arrives, so the cut always falls in the newest piece (llama-server checks a token later, and
    then cuts text it may already have streamed). `t_max_predict_ms`: past this long generating, the answer ends at a new line."""

    def __init__(self, n_indent: int = 0, t_max_predict_ms: int = 0):
        self.n_indent, self.t_max_s = n_indent, t_max_predict_ms / 1000
        self.text = ""
        self.stopped = False
        self._checked = 0  # lines starting before this position are known to be indented enough (or are first)

    def feed(self, piece: str, generating_s: float) -> tuple[str, bool]:
        """What of `piece` to keep, and whether the answer ends here."""
        start = len(self.text)
        self.text += piece
        if self.n_indent > 0:
            line = self.text.find("\n", self._checked)
            while line >= 0:
                line += 1  # the start of a line after the first
                body = line
                while body < len(self.text) and self.text[body] in " \t":
                    body += 1
                if body == len(self.text):  # nothing but indentation yet: decided by a later piece
                    self._checked = line - 1
                    break
                if body - line < self.n_indent:  # a blank line too, as llama-server
                    self.text, self.stopped = self.text[:body], True
                    return piece[:body - start], True
                self._checked = line
                line = self.text.find("\n", line)
            else:
                self._checked = len(self.text)
        if "\n" in piece and self.t_max_s > 0 and generating_s > self.t_max_s:
            self.stopped = True
            return piece, True
        return piece, False
