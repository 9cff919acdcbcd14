"""One prompt being decoded: what it asked for, what it has emitted, and how it ended."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.sampling import RowSampling

FINISH_REASONS = ("stop", "length", "cancelled")
"""Why a sequence ended: "stop" (EOS or a stop condition of its client), "length" (its token
budget), "cancelled" (its client went away). OpenAI's `finish_reason` uses the first two."""


@dataclass(eq=False)
class Sequence:
    """A prompt and its decoding state, owned by the decoding loop while it runs.

    prompt: token ids. max_new_tokens: the budget. temperature (0: greedy), top_p, seed, stream:
    output token i is drawn with u(seed, stream, i) (`specdec.sampling`). output: the new tokens so
    far (EOS included when it ended the sequence). finish_reason: None while running, else one of
    `FINISH_REASONS`. on_tokens(seq, tokens): told, on the loop's thread, each run of tokens the
    sequence keeps (a server forwards them to its client and may call `finish`). arrival_s /
    first_token_s: `time.perf_counter()` at submission and at the first new token. preemptions:
    how often the loop gave its cache back to resume it later (recomputing its context).
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0
    on_tokens: Callable[["Sequence", list[int]], None] | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        """End the sequence (any thread): the loop retires it before its next step and frees its row.
        The first reason given stays."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if self.finish_reason is None:
            self.finish_reason = reason

    @property
    def tokens_left(self) -> int:
        """New tokens it may still emit (`max_new_tokens` less those emitted)."""
        return self.max_new_tokens - len(self.output)

    @property
    def context(self) -> list[int]:
        """What a (re)admission prefills: the prompt and every emitted token but the last, which
        is the pending one (not in the cache yet). A fresh sequence: the prompt."""
        return self.prompt + self.output[:-1]

    @property
    def context_len(self) -> int:
        """`len(self.context)`: while it decodes, the tokens its cache row holds."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    def sampling(self) -> RowSampling:
        """This sequence's settings as one row of a batch."""
        return RowSampling((self.temperature,), (self.top_p,), (self.seed,), (self.stream,))
