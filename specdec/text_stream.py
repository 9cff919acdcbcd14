"""Tokens to text as they arrive: incremental detokenization with stop strings.

A streamed piece is only sent once it cannot change: text that ends in an incomplete UTF-8
character (the tokenizer's U+FFFD) and any tail that could be the start of a stop string are held
back until the next tokens settle them. When a stop string appears, the text ends just before it
(the stop string itself is never sent) and the stream is finished.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    """decode(token_ids) -> text of all tokens so far; stop: strings that end the text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None) -> None:
        self.decode, self.stop = decode, [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.text = ""  # everything sent so far
        self.stopped = False

    def push(self, tokens: list[int]) -> str:
        """Add tokens; return the new text that is safe to send (maybe ""). After a stop string,
        `stopped` is True and further tokens add nothing."""
        if self.stopped:
            return ""
        self.tokens += tokens
        full = self.decode(self.tokens)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        safe = len(full.rstrip(REPLACEMENT))
        safe -= self._partial_stop(full[:safe])
        return self._advance(full[:safe])

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (held-back text included)."""
        if self.stopped:
            return ""
        return self._advance(self.decode(self.tokens))

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""  # nothing new (or the decoder rewrote sent text, which cannot be unsent)
        piece, self.text = upto[len(self.text):], upto
        return piece

    def _stop_at(self, full: str) -> int | None:
        """Index where the earliest stop string starts (None: none present)."""
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        return max(min(hits), len(self.text)) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold
