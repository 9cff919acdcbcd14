"""Continuous batching: requests queue up, join the decoding loop between steps when a cache row is
free, and leave it as they finish. A server runs one scheduler for its life; `Engine.generate`
runs one per call (`Scheduler.for_batch`: its prompts queued at once, over the engine's dense pool).

The loop itself is `specdec.speculative.SpeculativeDecoder` (`admit` + `step`); the scheduler
owns it on one thread (`run`, or `generate_all` on the caller's) and decides, before each
step, which waiting sequences join: first come first served, while rows are free and the prompt
tokens admitted in this round stay within `prefill_tokens` (at least one sequence per round), so
running streams keep getting steps while a burst of prompts is prefilled.

Cache: a paged pool (`specdec.paged_cache`) of `cache_tokens` slots in blocks of `block_size`,
shared by up to `max_rows` sequences. A sequence joins when a row is free and the pool has blocks
for its context and first step; before each step every row is given blocks for what the step may
write. When the pool runs dry mid-generation, the most recently admitted sequences are preempted:
their blocks go back and they return to the front of the queue, to be prefilled again over their
prompt and what they emitted (recomputation: nothing they emitted is lost or changed).

Prefill budget: at most `prefill_tokens` context tokens are prefilled per round. A context longer
than that is prefilled in chunks, one per round within what the round's budget leaves, in a row of
its own while the running streams keep stepping (chunked prefill; one such sequence at a time).
While streams are running, a chunk is also cut to what takes `CHUNK_STEP_SHARE` of one decoding
step, from the step time and the prefill time per token measured on this machine as it runs
(running averages), so that a stream's time per token at most about doubles during a long prefill.

Under torchrun (tensor/expert-parallel ranks) rank 0 schedules and the other ranks follow: before
each round rank 0 broadcasts what it decided (`Round`: which sequences its clients finished, which
join, which long context starts its chunks, the chunk budget), and each follower replays it on its
own copy of the sequences (`follow`). Everything else a step decides is either computed the same on
every rank from the same tensors (tokens, EOS, preemption by free blocks) or broadcast inside the
step (the adaptive depth). So that a client's cancel or stop string ends a sequence at the same step
on every rank, clients end sequences through `Scheduler.finish`, which takes effect at the next round.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.model.errors import ConfigError, SpecdecError
from specdec.paged_cache import PagedLatentCache
from specdec.config import SpecConfig
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder


CHUNK_STEP_SHARE = 0.8
"""A chunk prefilled beside running streams takes about this share of one decoding step's time."""
MIN_CHUNK = 16
"""Fewest tokens a chunk is cut to (a long prompt still advances when steps are quick)."""
EMA = 0.2
"""Weight of the newest timing in the running averages of step time and prefill time per token."""


@dataclass
class Round:
    """What rank 0 decided for one round of the loop, as followers replay it.

    finish: (sequence id, reason) for each sequence a client ended since the last round. join:
    sequences admitted this round, each as `_wire` gives it (id, then its request fields, or only
    the id of one the followers already hold: a preempted one). chunked: the long context that
    starts its chunked prefill this round (same form), or None. budget: context tokens the round
    may prefill in chunks. step: False for a heartbeat (nothing to do; keeps idle followers from
    timing out). stop: the loop has ended; followers return.
    """

    finish: list[tuple[int, str]] = field(default_factory=list)
    join: list[tuple] = field(default_factory=list)
    chunked: tuple | None = None
    budget: int = 0
    step: bool = True
    stop: bool = False


class QueueFull(SpecdecError):
    """The waiting queue is at its limit: the client should retry later."""


class NotAccepting(SpecdecError):
    """The scheduler is draining (shutting down): no new requests."""


class Scheduler:
    """Owns a decoder and its cache pool; `submit` from any thread, `run` on the loop's thread.

    engine: a loaded `Engine`; compiled (`--compile`), its steps run compiled over the paged pool
    (`CompiledDecode.step`), adaptive ones at plain steps or `spec.depth` (`Engine.policy_depths`).
    spec: the draft shape (a chain, adaptive when `spec.adapts`, or a tree), None: plain decoding. max_rows: sequences decoded
    at once (cache rows). max_waiting: queue limit (`QueueFull` beyond it). prefill_tokens: prompt
    tokens admitted per round at most (one sequence is always admitted when a row is free).
    on_step(scheduler, kept): called on the loop thread after each step with the tokens each live
    sequence kept (metrics). static: admit only into an empty batch, which then runs until its
    last sequence ends (static batching, the baseline `bench serve` compares against).
    cache_tokens: slots in the paged pool (default: `max_rows` × the context, which never preempts);
    block_size: slots per block.

    `Engine.generate` runs its prompts through a scheduler too (`for_batch`): its own decoder (the
    call's sampling settings and draft mode) over the engine's dense pool.
    """

    def __init__(self, engine, spec: SpecConfig | None, max_rows: int = 32, max_waiting: int = 256,
                 prefill_tokens: int = 512,
                 on_step: Callable[["Scheduler", list[int]], None] | None = None, static: bool = False,
                 cache_tokens: int | None = None, block_size: int = 16) -> None:
        if spec is not None and spec.draft_mode != "onehot":
            raise ConfigError("--draft-mode: the server drafts one-hot chains only (coupled to each request's own seed)")
        cache_tokens = max_rows * engine.max_seq_len if cache_tokens is None else cache_tokens
        for name, value in (("--max-batch", max_rows), ("--max-waiting", max_waiting),
                            ("--prefill-tokens", prefill_tokens), ("--cache-tokens", cache_tokens),
                            ("--block-size", block_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        policy = engine.policy_for(spec) if engine.adapts(spec) else None
        decoder = SpeculativeDecoder(engine, spec, policy=policy)
        decoder.record_tpot = False  # a server's metrics time tokens per request instead
        args = engine.args
        decoder.use_cache(PagedLatentCache(args, args.n_layers + args.n_mtp_layers, max_rows,
                                           -(-cache_tokens // block_size), block_size, engine.max_seq_len,
                                           engine.model.dtype, engine.device, engine.kv_cache_dtype))
        self._setup(engine, spec, decoder, max_rows, max_waiting, prefill_tokens, on_step, static)

    @classmethod
    def for_batch(cls, engine, decoder: SpeculativeDecoder, max_rows: int, n_sequences: int,
                  prefill_tokens: int) -> "Scheduler":
        """A scheduler for one batch of `n_sequences` known in advance (`Engine.generate`): `decoder`
        with its cache already set (`use_cache`, a dense pool of at least `max_rows` rows; compiled
        forwards allowed), at most `max_rows` decoding at once, the others joining as rows free up."""
        self = cls.__new__(cls)
        self._setup(engine, decoder.spec, decoder, max_rows, max(n_sequences, 1), prefill_tokens, None, False)
        # under torchrun every rank runs the same call on the same prompts, and what a round admits
        # depends only on which sequences ended (the same tokens on every rank): no lockstep messages
        self.lockstep = False
        return self

    def _setup(self, engine, spec: SpecConfig | None, decoder: SpeculativeDecoder, max_rows: int, max_waiting: int,
               prefill_tokens: int, on_step: Callable[["Scheduler", list[int]], None] | None, static: bool) -> None:
        self.engine, self.spec, self.decoder = engine, spec, decoder
        self.cache = decoder.cache
        self.max_rows, self.max_waiting, self.prefill_tokens = max_rows, max_waiting, prefill_tokens
        self.on_step, self.static = on_step, static
        self.waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self.accepting = True
        self.steps = 0
        self.preemptions = 0  # sequences preempted so far
        self._step_s: float | None = None  # running average of a decoding step's seconds
        self._prefill_token_s: float | None = None  # and of a chunk's seconds per token
        self.lockstep = engine.ctx.world_size > 1  # torchrun: rank 0 schedules, the others follow
        self._finishing: list[tuple[Sequence, str]] = []  # lockstep: ends asked for since the last round
        self._ids: dict[Sequence, int] = {}  # lockstep, rank 0: the id followers know each sequence by
        self._next_id = 0
        self._closed = False

    # ------------------------------------------------------------------ any thread

    @property
    def draft_slots(self) -> int:
        return self.spec.draft_slots if self.spec is not None else 0

    @property
    def context_limit(self) -> int:
        """Slots one sequence may use: the context, and no more than the whole pool holds."""
        if self.cache.block_table is None:  # a dense pool: every row holds all its slots
            return min(self.engine.max_seq_len, self.cache.seq_len)
        return min(self.engine.max_seq_len, self.cache.n_blocks * self.cache.block_size)

    def max_new_tokens_for(self, prompt_len: int) -> int:
        """The largest budget a prompt of this many tokens can have (0: the prompt alone is too long)."""
        return max(self.context_limit - prompt_len - self.draft_slots, 0)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` (its prompt + budget must fit: `max_new_tokens_for`). Raises `NotAccepting`
        while draining and `QueueFull` at the queue limit."""
        if seq.max_new_tokens > self.max_new_tokens_for(len(seq.prompt)):
            raise ConfigError(f"prompt of {len(seq.prompt)} tokens + max_tokens {seq.max_new_tokens} exceeds the "
                              f"context of {self.context_limit} tokens")
        with self._wake:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit)")
            self.waiting.append(seq)
            self._wake.notify()

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` for its client (any thread; see `Sequence.finish`). Alone it ends at once; under
        torchrun it ends at the start of the next round, on every rank at the same step."""
        if not self.lockstep:
            seq.finish(reason)
            return
        with self._wake:
            self._finishing.append((seq, reason))
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
        """Share of the pool's blocks held by sequences (0..1)."""
        return self.cache.used_blocks / self.cache.n_blocks


    # ------------------------------------------------------------------ the loop's thread

    def run(self, idle_wait_s: float = 0.5) -> None:
        """Admit and step until drained and empty (blocks; run it on its own thread); then release
        the followers, if any (after an error they are left waiting: a collective may be half done)."""
        while True:
            with self._wake:
                while not self.waiting and not self.busy and self.accepting and not self._finishing:
                    if not self._wake.wait(idle_wait_s) and self.lockstep:
                        self._send(Round(step=False))
                finished = self._apply_finishing()
                if not self.waiting and not self.busy:
                    if finished and self.lockstep:  # ends of preempted sequences the followers hold
                        self._send(Round(finished, step=False))
                    if not self.accepting:
                        break
                    continue
                joining, chunked = self.take_admissible()
            self.run_once(joining, chunked, finished)
        self.close()

    @property
    def busy(self) -> bool:
        """Sequences are decoding or being prefilled in chunks."""
        return bool(self.decoder.running) or self.decoder.prefilling is not None

    def run_once(self, joining: list[Sequence], chunked: Sequence | None = None,
                 finished: list[tuple[int, str]] | None = None) -> None:
        """One round (rank 0): admit `joining`, start the chunked prefill of `chunked`, prefill a chunk
        with what is left of the round's prefill budget, then one step over everything live. Under
        torchrun the round is first sent to the followers (`finished`: the ends they must apply)."""
        budget = self._chunk_budget(joining)
        if self.lockstep:
            self._send(Round(finished or [], [self._wire(s) for s in joining],
                             self._wire(chunked) if chunked is not None else None, budget))
        self._play(joining, chunked, budget)

    def _chunk_budget(self, joining: list[Sequence]) -> int:
        """Context tokens this round may prefill in chunks: what admitting `joining` left of the
        prefill budget and, while streams will run, what fits in `CHUNK_STEP_SHARE` of a step."""
        budget = self.prefill_tokens - sum(len(s.context) for s in joining)
        if joining or any(not s.finished for s in self.decoder.running):  # until both are timed, chunks start small
            fits = (MIN_CHUNK if not (self._step_s and self._prefill_token_s)
                    else int(CHUNK_STEP_SHARE * self._step_s / self._prefill_token_s))
            budget = min(budget, max(MIN_CHUNK, fits))
        return budget

    def _play(self, joining: list[Sequence], chunked: Sequence | None, budget: int) -> None:
        """Carry out one round on this rank (rank 0 and followers alike)."""
        if chunked is not None:
            self.decoder.start_prefill(chunked)
        self.decoder.admit(joining)
        t0 = time.perf_counter()
        n = self.decoder.prefill_chunk(budget)
        t1 = time.perf_counter()
        if n:
            self._prefill_token_s = _average(self._prefill_token_s, (t1 - t0) / n)
        kept = self.decoder.step()
        if kept:
            self._step_s = _average(self._step_s, time.perf_counter() - t1)
        if self.decoder.preempted:  # back to the front of the queue, oldest first (followers keep them by id)
            if not self.following:
                with self._wake:
                    for seq in self.decoder.preempted:
                        self.waiting.appendleft(seq)
            self.preemptions += len(self.decoder.preempted)
            self.decoder.preempted = []
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self, kept)

    # ------------------------------------------------------------------ torchrun lockstep

    @property
    def following(self) -> bool:
        """This rank replays rank 0's rounds (torchrun, rank > 0)."""
        return self.lockstep and self.engine.ctx.rank != 0

    def _send(self, round_: Round) -> None:
        self.engine.ctx.broadcast_object(round_, self.engine.device)

    def _apply_finishing(self) -> list[tuple[int, str]]:
        """End the sequences clients asked to end since the last round (caller holds the lock);
        returns (id, reason) for those the followers hold."""
        ends = [(self._ids[seq], reason) for seq, reason in self._finishing if seq in self._ids]
        for seq, reason in self._finishing:
            seq.finish(reason)
        self._finishing = []
        for seq in [s for s in self._ids if s.finished]:
            del self._ids[seq]
        return ends

    def _wire(self, seq: Sequence) -> tuple:
        """`seq` as a round names it: (id,) when followers hold it, else its id and request fields."""
        if seq in self._ids:
            return (self._ids[seq],)
        self._ids[seq] = uid = self._next_id
        self._next_id += 1
        return (uid, seq.prompt, seq.max_new_tokens, seq.temperature, seq.top_p, seq.seed, seq.stream)

    def follow(self) -> None:
        """Replay rank 0's rounds until its loop ends (torchrun ranks > 0; blocks)."""
        held: dict[int, Sequence] = {}

        def local(wire: tuple) -> Sequence:
            if len(wire) == 1:
                return held[wire[0]]
            uid, prompt, max_new, temperature, top_p, seed, stream = wire
            held[uid] = Sequence(list(prompt), max_new, temperature, top_p, seed, stream)
            return held[uid]

        while True:
            round_: Round = self.engine.ctx.broadcast_object(None, self.engine.device)
            if round_.stop:
                return
            for uid, reason in round_.finish:
                if uid in held:
                    held.pop(uid).finish(reason)
            if round_.step:
                self._play([local(w) for w in round_.join],
                           local(round_.chunked) if round_.chunked is not None else None, round_.budget)
            for uid in [u for u, s in held.items() if s.finished]:
                del held[uid]

    def close(self) -> None:
        """Release the followers (rank 0 under torchrun; once; a no-op otherwise)."""
        if self.lockstep and not self.following and not self._closed:
            self._closed = True
            self._send(Round(step=False, stop=True))

    def take_admissible(self) -> tuple[list[Sequence], Sequence | None]:
        """Pop the waiting sequences that join this round, and the long context (if any) that starts
        its chunked prefill (caller holds the lock); ones finished while waiting (cancelled) are dropped."""
        joining, tokens, blocks = [], 0, 0
        if self.static and self.decoder.running:
            return joining, None
        while self.waiting:
            seq = self.waiting[0]
            if seq.finished:
                self.waiting.popleft()
                continue
            if len(seq.context) > self.prefill_tokens and not self.static:  # chunked, in a row of its own
                if self.decoder.prefilling is not None or not self.decoder.admits_now(seq, len(joining), blocks):
                    break
                return joining, self.waiting.popleft()
            if self.running + len(joining) >= self.max_rows or not self.decoder.admits_now(seq, len(joining), blocks):
                break
            if joining and tokens + len(seq.context) > self.prefill_tokens and not self.static:
                break
            self.waiting.popleft()
            joining.append(seq)
            tokens += len(seq.context)
            if self.cache.block_table is not None:  # a paged pool (a dense one's rows hold their slots)
                blocks += self.cache.blocks_for(len(seq.context) + self.decoder.step_slots)
        return joining, None

    def generate_all(self, seqs: list[Sequence], timeout_s: float | None = None) -> None:
        """Submit `seqs` and run the loop on this thread until all of them finish (tests, offline use;
        under torchrun on rank 0, with `follow` on the others, and `close` once done)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(seqs)
        while pending or self.waiting or self.busy:
            while pending and len(self.waiting) < self.max_waiting:
                self.submit(pending.pop(0))
            with self._wake:
                finished = self._apply_finishing()
                joining, chunked = self.take_admissible()
            self.run_once(joining, chunked, finished)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("generate_all ran past its deadline")


def _average(old: float | None, new: float) -> float:
    """Running average with weight `EMA` on the newest value (the first value as is)."""
    return new if old is None else (1 - EMA) * old + EMA * new
