"""Continuous batching for a server: requests queue up, join the decoding loop between steps when a
cache row is free, and leave it as they finish.

The loop itself is `specdec.speculative.SpeculativeDecoder` (`admit` + `step`), the one that
`Engine.generate` runs; the scheduler owns it on one thread (`run`) and decides, before each
step, which waiting sequences join: first come first served, while rows are free and the prompt
tokens admitted in this round stay within `prefill_tokens` (at least one sequence per round), so
running streams keep getting steps while a burst of prompts is prefilled.

Cache: one pool of `max_rows` rows × `max_seq_len` slots, allocated up front; a sequence holds one
row from its admission to its end, so a sequence whose prompt, budget and draft slots fit
`max_seq_len` can never run out of cache mid-generation (nothing is preempted). Not here yet: a
paged pool (blocks shared out by need), chunked prefill of a single long prompt, and lockstep
followers under torchrun.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from model.errors import ConfigError, SpecdecError
from specdec.cache import LatentCache
from specdec.config import SpecConfig
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder


class QueueFull(SpecdecError):
    """The waiting queue is at its limit: the client should retry later."""


class NotAccepting(SpecdecError):
    """The scheduler is draining (shutting down): no new requests."""


class Scheduler:
    """Owns a decoder and its cache pool; `submit` from any thread, `run` on the loop's thread.

    engine: a loaded `Engine` (eager: compiled forwards are not supported here). spec: the draft
    shape (a chain; adaptive when `spec.adapts`), None: plain decoding. max_rows: sequences decoded
    at once (cache rows). max_waiting: queue limit (`QueueFull` beyond it). prefill_tokens: prompt
    tokens admitted per round at most (one sequence is always admitted when a row is free).
    on_step(scheduler, kept): called on the loop thread after each step with the tokens each live
    sequence kept (metrics). static: admit only into an empty batch, which then runs until its
    last sequence ends (static batching, the baseline `bench serve` compares against).
    """

    def __init__(self, engine, spec: SpecConfig | None, max_rows: int = 32, max_waiting: int = 256,
                 prefill_tokens: int = 2048,
                 on_step: Callable[["Scheduler", list[int]], None] | None = None, static: bool = False) -> None:
        if engine.compiled is not None:
            raise ConfigError("--compile: the server runs eager forwards only (compiled steps need a static batch)")
        if spec is not None and spec.topk > 1:
            raise ConfigError("--tree-topk: the server drafts chains only (trees are not supported here yet)")
        if spec is not None and spec.draft_mode != "onehot":
            raise ConfigError("--draft-mode: the server drafts one-hot (argmax) chains only")
        for name, value in (("--max-batch", max_rows), ("--max-waiting", max_waiting),
                            ("--prefill-tokens", prefill_tokens)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        self.engine, self.spec = engine, spec
        policy = engine.policy_for(spec) if spec is not None and spec.adapts else None
        self.decoder = SpeculativeDecoder(engine, spec, policy=policy)
        self.decoder.record_tpot = False  # a server's metrics time tokens per request instead
        args = engine.args
        self.decoder.use_cache(LatentCache(args, args.n_layers + args.n_mtp_layers, max_rows, engine.max_seq_len,
                                           engine.model.dtype, engine.device))
        self.max_rows, self.max_waiting, self.prefill_tokens = max_rows, max_waiting, prefill_tokens
        self.on_step, self.static = on_step, static
        self.waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self.accepting = True
        self.steps = 0

    # ------------------------------------------------------------------ any thread

    @property
    def draft_slots(self) -> int:
        return self.spec.draft_slots if self.spec is not None else 0

    def max_new_tokens_for(self, prompt_len: int) -> int:
        """The largest budget a prompt of this many tokens can have (0: the prompt alone is too long)."""
        return max(self.engine.max_seq_len - prompt_len - self.draft_slots, 0)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` (its prompt + budget must fit: `max_new_tokens_for`). Raises `NotAccepting`
        while draining and `QueueFull` at the queue limit."""
        if seq.max_new_tokens > self.max_new_tokens_for(len(seq.prompt)):
            raise ConfigError(f"prompt of {len(seq.prompt)} tokens + max_tokens {seq.max_new_tokens} exceeds the "
                              f"context of {self.engine.max_seq_len} tokens")
        with self._wake:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit)")
            self.waiting.append(seq)
            self._wake.notify()

    def drain(self) -> None:
        """Stop admitting new requests; `run` returns once the queued and running ones finish."""
        with self._wake:
            self.accepting = False
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self.decoder.running)

    def cache_usage(self) -> float:
        """Share of the pool's rows held by sequences (0..1)."""
        return self.running / self.max_rows

    # ------------------------------------------------------------------ the loop's thread

    def run(self, idle_wait_s: float = 0.5) -> None:
        """Admit and step until drained and empty (blocks; run it on its own thread)."""
        while True:
            with self._wake:
                while not self.waiting and not self.decoder.running and self.accepting:
                    self._wake.wait(idle_wait_s)
                if not self.waiting and not self.decoder.running and not self.accepting:
                    return
                joining = self._take_admissible()
            self.run_once(joining)

    def run_once(self, joining: list[Sequence]) -> None:
        """Admit `joining`, then one step over everything live."""
        self.decoder.admit(joining)
        kept = self.decoder.step()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self, kept)

    def _take_admissible(self) -> list[Sequence]:
        """Pop the waiting sequences that join this round (caller holds the lock); ones finished
        while waiting (cancelled) are dropped."""
        joining, tokens = [], 0
        free = min(self.decoder.free_rows(), self.max_rows - len(self.decoder.running))
        if self.static and self.decoder.running:
            return joining
        while self.waiting and len(joining) < free:
            seq = self.waiting[0]
            if seq.finished:
                self.waiting.popleft()
                continue
            if joining and tokens + len(seq.prompt) > self.prefill_tokens and not self.static:
                break
            self.waiting.popleft()
            joining.append(seq)
            tokens += len(seq.prompt)
        return joining

    def generate_all(self, seqs: list[Sequence], timeout_s: float | None = None) -> None:
        """Submit `seqs` and run the loop on this thread until all of them finish (tests, offline use)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(seqs)
        while pending or self.waiting or self.decoder.running:
            while pending and len(self.waiting) < self.max_waiting:
                self.submit(pending.pop(0))
            with self._wake:
                joining = self._take_admissible()
            self.run_once(joining)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("generate_all ran past its deadline")
