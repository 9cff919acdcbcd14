"""The decoding loop (continuous batching) around MTP speculative decoding steps (`specdec.steps`).

Sequences (`specdec.sequence`) join between steps (`SpeculativeDecoder.admit`: their prefill),
every step runs all live rows together, and each leaves when it finishes; `Engine.generate` and
the server (`specdec.scheduler`) both drive this one loop. A step of depth 0 is a plain step
(the verifier alone): plain decoding is the loop with no drafter.

State per active row b (cache rows are kept as a prefix 0..B-1 of the shared latent pool):
  * `cache.lengths[b]` = L: verifier cache holds tokens x_0..x_{L-1};
  * `pending[b]` = x_L: the last emitted token, not yet in the verifier cache;
  * the MTP cache holds positions 0..L-1, each from a *verifier* hidden state (pair (h_i, x_{i+1}));
  * `draft_logits[b]`, `draft_hidden[b]`: the MTP output at position L-1, i.e. the first draft's
    distribution (for x_{L+1}) and the hidden state that seeds depth 2.

One step is `specdec.steps.decode_step` (draft → verify → accept → commit, or a plain step): a
function of tensors that reads nothing back; this loop prepares its inputs (the live rows' state,
their sampling settings and random numbers, the slots attention spans, from host bookkeeping),
reads its emitted tokens back once, and hands them to the sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from specdec.acceptance import cut_run
from specdec.adaptive import CATCH_UP, PROMPT_CATCH_UP, SpeculationPolicy
from specdec.cache import LatentCache
from specdec.config import GenerationStats
from specdec.paged_cache import PagedLatentCache
from specdec.sampling import RowSampling
from specdec.sequence import Sequence
from specdec.steps import StepResult, StepRows, StepShape, catch_up, verifier_state
from specdec.tree import visible_slots


@dataclass
class AcceptanceCounts:
    """Running totals for the metrics over row-steps of any depth (0: a plain step).

    per_position[i]: row-steps whose first i+1 drafts were all accepted; drafted_at[i]: row-steps
    that drafted at least i+1 tokens; depth_steps[d]: steps (not row-steps) run at depth d;
    rows_steps[d][r]: steps run at depth d over r live rows (a static batch's last steps run fewer
    rows as its rows finish: what a step bound prices, `bench.latency`)."""

    row_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    per_position: list[int] = field(default_factory=list)
    drafted_at: list[int] = field(default_factory=list)
    rows_steps: list[list[int]] = field(default_factory=list)

    @property
    def depth_steps(self) -> list[int]:
        return [sum(by_rows) for by_rows in self.rows_steps]

    def add(self, n_accepted: list[int], depth: int) -> None:
        grow = depth + 1 - len(self.rows_steps)
        if grow > 0:
            self.per_position += [0] * grow
            self.drafted_at += [0] * grow
            self.rows_steps += [[] for _ in range(grow)]
        by_rows = self.rows_steps[depth]
        by_rows += [0] * (len(n_accepted) + 1 - len(by_rows))
        by_rows[len(n_accepted)] += 1
        for a in n_accepted:
            self.row_steps += 1
            self.drafted += depth
            self.accepted += a
            self.emitted += a + 1
            for i in range(depth):
                self.drafted_at[i] += 1
            for i in range(a):
                self.per_position[i] += 1

    def acceptance_per_position(self, max_depth: int) -> list[float]:
        """Share of the row-steps that drafted at least i+1 tokens whose first i+1 were all accepted."""
        return [self.per_position[i] / self.drafted_at[i] if i < len(self.drafted_at) and self.drafted_at[i] else 0.0
                for i in range(max_depth)]


class PromptPairs(NamedTuple):
    """The prompts' MTP inputs, kept while their MTP prefill is deferred (B rows, right-padded to P).

    tokens `[B, P]`: x_{i+1} at i (the first emitted token at i = length-1); hidden `[B, P, dim]`:
    the verifier state h_i; lengths `[B]`: each prompt's length (tokens prefilled, for a chunk)."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    lengths: torch.Tensor


@dataclass
class RowState:
    """Per-row loop state between steps (B live rows, cache rows 0..B-1).

    pending: `[B]` x_L. draft_logits `[B, V]` / draft_hidden `[B, dim]`: the MTP output at position
    L-1 (first draft's distribution, depth-2 seed); stale while `lag_tokens` is set; None when
    decoding plainly.
    lag_hidden: w tensors `[B, 1, dim]` / lag_tokens: w tensors `[B, 1]`: the pairs (h_i, x_{i+1}),
    i = L-w..L-1, of the last w plain steps, which the MTP cache has not seen yet (kept as lists and
    joined once by `_catch_up`, so a plain stretch costs no growing copies).
    prompt: the prompts' pairs, when their MTP prefill was deferred (`PromptPairs`); the lag follows them.
    """

    pending: torch.Tensor
    draft_logits: torch.Tensor | None
    draft_hidden: torch.Tensor | None
    lag_hidden: list[torch.Tensor] = field(default_factory=list)
    lag_tokens: list[torch.Tensor] = field(default_factory=list)
    prompt: "PromptPairs | None" = None

    @property
    def lagging(self) -> bool:
        """Whether the MTP cache is behind the verifier's (deferred prompt pairs or plain steps)."""
        return bool(self.lag_tokens) or self.prompt is not None

    def select(self, index: torch.Tensor) -> "RowState":
        """The state of rows `index` (in that order)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        prompt = None if self.prompt is None else PromptPairs(*(pick(t) for t in self.prompt))
        return RowState(pick(self.pending), pick(self.draft_logits), pick(self.draft_hidden),
                        [pick(t) for t in self.lag_hidden], [pick(t) for t in self.lag_tokens], prompt)

    def join(self, new: "RowState") -> "RowState":
        """This state's rows followed by `new`'s (neither lagging: see `SpeculativeDecoder.admit`)."""
        if self.lagging or new.lagging:
            raise ValueError("rows that lag behind plain steps cannot be joined")
        both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return RowState(both(self.pending, new.pending), both(self.draft_logits, new.draft_logits),
                        both(self.draft_hidden, new.draft_hidden))


class SpeculativeDecoder:
    """The decoding loop: sequences join between steps, every step runs the live ones together, and
    each leaves as it finishes (continuous batching over the rows of one latent-cache pool).

    `spec`: MTP drafting of that shape (None: plain decoding, the drafter never runs). With
    `policy` (adaptive speculation, `specdec.adaptive`), each step's draft depth is chosen in
    0..spec.depth, 0 being a plain step (verifier only); None: every step drafts `spec.depth`.
    Sequences may differ in sampling settings (greedy and sampled rows mix) except with sampled
    drafts (`draft_mode="sample"`), whose rows share the decoder's `temperature` and `top_p`.

    A scheduler (`specdec.scheduler`: a server's, or the one `Engine.generate` runs a batch of
    prompts through) keeps one decoder and calls `admit` and `step`. Cache row r holds
    `running[r]`; the live rows are a prefix of the pool.
    """

    def __init__(self, engine, spec, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 policy: SpeculationPolicy | None = None) -> None:
        """`temperature`, `top_p`, `seed`: the settings of an `Engine.generate` call's prompts, and
        those of sampled drafts."""
        self.eng, self.spec = engine, spec
        self.model, self.drafter = engine.run_verifier, engine.run_drafter  # forwards (maybe compiled)
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.sampled_drafts = spec is not None and spec.draft_mode == "sample" and temperature > 0
        self.generator = torch.Generator(engine.device).manual_seed(seed)  # sampled drafts and their acceptance
        self.counts = AcceptanceCounts()
        self.policy = policy
        self.cache: LatentCache | PagedLatentCache | None = None
        self.preempted: list[Sequence] = []  # taken out for want of blocks; the scheduler queues them again
        self.prefilling: Sequence | None = None  # being prefilled in chunks (`start_prefill`), in the last row
        self.running: list[Sequence] = []
        self.sampling = RowSampling((), (), (), ())
        self.state: RowState | None = None
        self.steps = 0
        self.tpot: list[float] = []  # per-token latencies for `stats` (`record_tpot` False: none kept)
        self.record_tpot = True
        self.step_start = 0.0
        self.prefill_s = 0.0  # seconds spent admitting (prefilling) sequences
        self.observer: Callable[[StepResult], None] | None = None  # sees every step's result (`--tree auto`)
        self._row_settings: tuple = (None,)  # (sampling, temperature, top_p tensors) of the live rows

    # ------------------------------------------------------------------ the loop

    def use_cache(self, cache: LatentCache | PagedLatentCache) -> None:
        """Decode in `cache` (empty of live rows: before the first `admit`): a dense pool or a paged one."""
        self.cache = cache

    @torch.inference_mode()
    def admit(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` into the next free rows (one verifier forward, and the MTP layer over them
        when drafting), emit each one's first token, and let them join the next step. Their prompt +
        budget (+ draft slots) must fit the pool's slots and there must be free rows (the caller's
        checks). Rows still lagging behind plain steps are caught up first, so all rows' lags agree."""
        if not seqs:
            return
        start = time.perf_counter()
        first_row = len(self.running)
        for row, seq in enumerate(seqs, start=first_row):
            if not self.cache.reserve(row, len(seq.context)):
                raise RuntimeError(f"admit: no cache for a context of {len(seq.context)} tokens (check admits_now)")
        self._catch_up_live()
        sampling = sum((s.sampling() for s in seqs), RowSampling((), (), (), ()))
        resumed = [s.output[-1] if s.output else None for s in seqs]
        # adaptive decoding into an empty loop may never draft: the MTP prefill waits for the first
        # drafting step (`_catch_up`), so that plain-only decoding pays nothing for the drafter
        defer = self.policy is not None and self.state is None
        self._join(seqs, self._prefill(self.cache, [s.context for s in seqs], first_row, sampling, resumed, defer),
                   sampling)
        self._retire()
        now = time.perf_counter()
        self.prefill_s += now - start
        if first_row == 0:  # the next step's tokens take its time from here (`_time_step`)
            self.step_start = now

    def _catch_up_live(self) -> None:
        """Bring the live rows' MTP cache level with their verifier cache (before rows join)."""
        if self.state is not None and self.spec is not None:
            self.state = self._catch_up(self.cache, self.cache.lengths[:len(self.running)], self.state)

    def _join(self, seqs: list[Sequence], new: RowState, sampling: RowSampling) -> None:
        """Prefilled `seqs` (cache rows len(running).., state `new`) join the loop; each fresh one
        keeps its first token (a resumed one emitted its pending token before it was preempted)."""
        self.state = new if self.state is None else self.state.join(new)
        self.running += seqs
        self.sampling = self.sampling + sampling
        now = time.perf_counter()
        for seq, token in zip(seqs, new.pending.tolist()):
            if not seq.output:
                seq.first_token_s = now
                self._keep(seq, [token])

    # ------------------------------------------------------------------ chunked prefill

    def start_prefill(self, seq: Sequence) -> None:
        """Take `seq` to be prefilled in chunks (`prefill_chunk`) in a row of its own (the pool's
        last), while the live rows keep stepping; it joins them after its last chunk. One at a time."""
        if self.prefilling is not None:
            raise RuntimeError("a chunked prefill is already in progress")
        self.prefilling = seq

    @torch.inference_mode()
    def prefill_chunk(self, budget: int) -> int:
        """Prefill up to `budget` more context tokens of the sequence taken by `start_prefill` (the
        verifier, then the MTP layer over the chunk's pairs); after its last chunk it joins the live
        rows. Returns the tokens prefilled (0: none pending, or the pool lacks blocks for now)."""
        seq, cache = self.prefilling, self.cache
        if seq is None or budget < 1:
            return 0
        if seq.finished:  # cancelled meanwhile
            cache.release(cache.batch - 1)
            self.prefilling = None
            return 0
        row, context = cache.batch - 1, seq.context
        start = int(cache.lengths[row])  # context tokens prefilled so far
        end = min(len(context), start + budget)
        last = end == len(context)
        if not cache.reserve(row, end + (self.step_slots if last else 0)):
            return 0
        sampling = seq.sampling()
        # after the last chunk its first token (a resumed sequence's pending one); else the token
        # after the chunk is the next chunk's first
        new = self._prefill(cache, [context[:end]], row, sampling, [seq.output[-1] if seq.output else None],
                            start=start, following=None if last else [context[end]])
        if last:
            self._catch_up_live()
            if len(self.running) != row:
                cache.move_row(row, len(self.running))
            self.prefilling = None
            self._join([seq], new, sampling)
        return end - start

    def admits_now(self, seq: Sequence, rows_taken: int = 0, blocks_taken: int = 0) -> bool:
        """Whether `seq` fits now beside `rows_taken` rows and `blocks_taken` blocks already promised
        this round: a free row, and (a paged pool) free blocks for its context and its first step."""
        if len(self.running) + rows_taken + (self.prefilling is not None) >= self.cache.batch:
            return False
        if self.cache.block_table is None:
            return True
        need = self.cache.blocks_for(len(seq.context) + self.step_slots)
        return blocks_taken + need <= self.cache.free_blocks

    @property
    def step_slots(self) -> int:
        """Slots a step writes past a row's committed tokens at most (the root and the drafts)."""
        return 1 + (self.spec.draft_slots if self.spec is not None else 0)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One decoding step over the live sequences (those finished meanwhile are retired first);
        returns how many tokens each live sequence kept, in row order."""
        self._retire()
        self._reserve_step()
        if not self.running:
            return []
        cache, state = self.cache, self.state
        rows = len(self.running)
        lengths = cache.lengths[:rows]
        depth = self.spec.depth if self.spec is not None else 0
        catch_up_kind = None if not state.lagging else CATCH_UP if state.prompt is None else PROMPT_CATCH_UP
        if self.policy:  # timings differ per rank: rank 0's choice holds for all
            left = [s.tokens_left for s in self.running]
            choice = self.policy.choose(rows, sum(left) / rows, catch_up_kind, deepest=max(left) - 1)
            depth = self.eng.ctx.broadcast_int(choice, self.eng.device)
        if depth > 0 and catch_up_kind is not None:  # after plain steps: not part of this step's cost
            t0 = time.perf_counter()
            state = self._catch_up(cache, lengths, state)
            if self.policy:
                self.policy.observe_catch_up(rows, time.perf_counter() - t0, catch_up_kind)
        t0, compilations = time.perf_counter(), self.eng.compilations
        state, n_acc, runs = self.advance(cache, lengths, state, depth)
        self.state = state
        self.counts.add(n_acc, depth)
        kept = self._emit(runs)
        if self.policy:  # a step that compiled its graph is no timing of a step
            seconds = time.perf_counter() - t0 if self.eng.compilations == compilations else None
            self.policy.observe(depth, rows, seconds, n_acc)
        self._time_step(kept)
        self.steps += 1
        self._retire()
        return kept

    def advance(self, cache: LatentCache, lengths: torch.Tensor, state: RowState,
                 depth: int) -> tuple[RowState, list[int], list[list[int]]]:
        """One step of `depth` over the rows at `lengths` (`state` caught up when depth ≥ 1):
        `specdec.steps.decode_step`, a plain step or draft → verify → accept → commit. Returns the
        new state, each row's accepted drafts and its run of new tokens (read back to the host once)."""
        shape = self._shape(depth)
        view = cache.step_view(self.eng.span_for(self.step_span(shape)))
        result = self.eng.run_step(view, self._step_rows(lengths, state, shape), shape)
        lengths.copy_(result.lengths)
        if self.observer is not None:
            self.observer(result)
        if depth > 0:
            state = RowState(result.pending, result.draft_logits, result.draft_hidden)
        elif self.spec is None:  # plain decoding: no drafter to catch up
            state = RowState(result.pending, None, None)
        else:  # the pair (h_L, x_{L+1}) joins the lag for `_catch_up`
            state = RowState(result.pending, state.draft_logits, state.draft_hidden,
                             state.lag_hidden + [result.verifier_hidden], state.lag_tokens + [result.run],
                             state.prompt)
        read = torch.cat([result.n_accepted.unsqueeze(1), result.run], dim=1).tolist()
        return state, [row[0] for row in read], [row[1:row[0] + 2] for row in read]

    def _shape(self, depth: int) -> StepShape:
        """The static settings of a step of `depth` (0: plain) over the live rows."""
        spec, sampling = self.spec, self.sampling
        sampled = any(t > 0 for t in sampling.temperature)
        if spec is None or depth == 0:  # only what a plain step computes: plain decoding's graphs serve it
            return StepShape(0, any_sampled=sampled, nucleus=sampling.nucleus,
                             verifier_hidden_kind=spec.verifier_hidden_kind if spec else "normed")
        return StepShape(depth, spec.topk, spec.n_nodes, self.sampled_drafts and depth > 0, sampled,
                         sampling.nucleus, spec.verifier_hidden_kind, spec.draft_hidden_kind, spec.draft_vocab)

    def step_span(self, shape: StepShape) -> int:
        """Slots a step's attention spans: the longest live row's committed tokens (its context,
        known on the host: no read of `cache.lengths`) and what the step writes past them."""
        longest = max(s.context_len for s in self.running)
        if shape.depth == 0:
            return longest + 1
        return longest + (self.spec.draft_slots if shape.topk > 1 else shape.depth + 1)

    def _step_rows(self, lengths: torch.Tensor, state: RowState, shape: StepShape) -> StepRows:
        """The per-row inputs of a step: state, sampling settings, and its random numbers (the race
        noise of the output positions a sampling row may reach; uniforms for sampled drafts)."""
        if self._row_settings[0] is not self.sampling:
            self._row_settings = (self.sampling, *self.sampling.tensors(lengths.device))
        _, temperature, top_p = self._row_settings
        draws = noise = None
        if shape.sampled_drafts:
            noise = torch.rand(len(lengths), shape.noise_width, generator=self.generator, device=lengths.device)
        elif shape.any_sampled:
            draws = self.sampling.exponentials([list(range(len(s.output), len(s.output) + shape.depth + 1))
                                                for s in self.running], self.eng.args.vocab_size, lengths.device)
        drafted = shape.depth > 0  # a plain step takes no draft inputs: plain decoding's graphs serve it
        return StepRows(lengths, state.pending, state.draft_logits if drafted else None,
                        state.draft_hidden if drafted else None, temperature, top_p,
                        draws, noise)

    def _time_step(self, kept: list[int]) -> None:
        """Each token a row kept took the step's wall time over the tokens it kept (`tpot`)."""
        now = time.perf_counter()
        if self.record_tpot:
            for n in kept:
                if n:
                    self.tpot.extend([(now - self.step_start) / n] * n)
        self.step_start = now

    # ------------------------------------------------------------------ steps

    def _prefill(self, cache: LatentCache, ids: list[list[int]], first_row: int = 0,
                 sampling: RowSampling | None = None, resumed: list[int | None] | None = None,
                 defer_drafter: bool = False, start: int = 0, following: list[int] | None = None) -> RowState:
        """Contexts `ids` into cache rows first_row.. from slot `start` on (slots below it already
        hold them: a chunked prefill's earlier chunks): the verifier over them, each one's first
        token (drawn with `sampling`, default: the decoder's settings, stream r for prompt r; for a
        resumed sequence, its pending token `resumed[r]`, already emitted; `following`: the known
        token after each context, for a chunk before the last), then, when drafting, the MTP layer
        over (h_i, x_{i+1}) for start ≤ i < P (`defer_drafter`: later, in `_catch_up`; the state
        keeps the pairs; from slot 0 only)."""
        eng = self.eng
        sampling = sampling or RowSampling.uniform(len(ids), self.temperature, self.top_p, self.seed)
        tokens, sizes = eng.pad([c[start:] for c in ids])
        batch, width = tokens.shape
        pos = start + torch.arange(width, device=eng.device).expand(batch, width)
        mask = visible_slots(pos[:, 0], width, start + width)  # causal over the new slots, all earlier ones
        kv, pe, table = cache.rows_from(first_row)  # views: writes land in the pool
        out = self.model(tokens, pos, kv, pe, pos, mask, (sizes - 1).unsqueeze(1), block_table=table)
        cache.lengths[first_row:first_row + batch] = sizes + start
        if following is not None:
            first = torch.tensor(following, dtype=tokens.dtype, device=eng.device)
        else:
            first = sampling.tokens(out.logits[:, :1], [[0]] * batch)[:, 0]
            known = [i for i, t in enumerate(resumed or []) if t is not None]
            if known:
                first[known] = torch.tensor([resumed[i] for i in known], dtype=first.dtype, device=first.device)
        if self.spec is None:
            return RowState(first, None, None)
        next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        next_tokens[torch.arange(batch), sizes - 1] = first
        pairs = PromptPairs(next_tokens, verifier_state(out, self.spec.verifier_hidden_kind), sizes)
        if defer_drafter and start == 0:
            return RowState(first, None, None, prompt=pairs)
        return RowState(first, *self._draft_prompts(kv, pe, table, pairs, start))

    def _draft_prompts(self, kv: torch.Tensor, pe: torch.Tensor, table: torch.Tensor | None,
                       pairs: PromptPairs, start: int = 0, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over the contexts' pairs (positions start..start+P-1 of the rows
        `kv`/`pe`/`table` begin with, the earlier ones already in its cache), `eager`: never through
        a compiled forward; returns the first draft's logits `[B, V]` and the depth-2 seed `[B, dim]`."""
        batch, width = pairs.tokens.shape
        pos = start + torch.arange(width, device=pairs.tokens.device).expand(batch, width)
        mask = visible_slots(pos[:, 0], width, start + width)
        drafter = self.eng.drafter if eager else self.drafter
        mtp = drafter(pairs.tokens, pairs.hidden, pos, kv, pe, pos, mask, (pairs.lengths - 1).unsqueeze(1),
                      self.spec.draft_vocab, block_table=table)
        return mtp.logits[:, 0], mtp.hidden(self.spec.draft_hidden_kind)[:, 0]

    def _catch_up(self, cache: LatentCache, lengths: torch.Tensor, state: RowState) -> RowState:
        """After plain steps: the MTP layer over the deferred prompt pairs if any (`_draft_prompts`),
        then over the w lagging pairs (`specdec.steps.catch_up`: positions L-w..L-1, one forward),
        which fills its cache rows and yields the first draft's distribution again.
        Its time is left out of the step costs the policy learns from (counting it against the draft
        step that follows a plain stretch would make drafting look dearer the longer plain decoding
        ran); the policy prices it into leaving plain decoding instead (`observe_catch_up`).
        It runs the drafter eagerly: compiled, every new lag width would compile a graph of its own
        in the middle of decoding."""
        if state.prompt is not None:
            first_draft = self._draft_prompts(cache.kv, cache.pe, cache.block_table, state.prompt, eager=True)
            state = RowState(state.pending, *first_draft, state.lag_hidden, state.lag_tokens)
        if not state.lag_tokens:
            return state
        view = cache.step_view(max(s.context_len for s in self.running))
        first_draft = catch_up(self.eng.drafter, view, lengths, torch.cat(state.lag_tokens, 1),
                               torch.cat(state.lag_hidden, 1), self._shape(1))
        return RowState(state.pending, *first_draft)

    # ------------------------------------------------------------------ bookkeeping

    def _emit(self, runs: list[list[int]], first_row: int = 0) -> list[int]:
        """Give run i to the sequence of row first_row + i (`_keep`); returns how many tokens each kept."""
        return [self._keep(self.running[first_row + i], run) for i, run in enumerate(runs)]

    def _keep(self, seq: Sequence, run: list[int]) -> int:
        """Append what `seq` keeps of `run` (cut at EOS, kept, and at its budget), finish it when
        either cut it, and tell its client; returns the number of tokens kept."""
        if seq.finished:  # finished by its client meanwhile: nothing more reaches it
            return 0
        kept, done = cut_run(run, self.eng.eos_ids, seq.tokens_left)
        seq.output.extend(kept)
        if done:
            seq.finish("stop" if kept and kept[-1] in self.eng.eos_ids else "length")
        if seq.on_tokens is not None and kept:
            seq.on_tokens(seq, kept)
        return len(kept)

    def _retire(self) -> None:
        """Drop finished sequences (their rows, and a paged pool's blocks, become free)."""
        self._drop([r for r, s in enumerate(self.running) if s.finished])

    def _reserve_step(self) -> None:
        """Make every live row hold the slots the next step may write (a paged pool), preempting the
        most recently admitted sequences while the pool has too few free blocks: their blocks go back,
        and they wait in `preempted` to be admitted again (recomputing their context; see `admit`)."""
        cache = self.cache
        if cache.block_table is None:
            return
        lengths = cache.lengths[:len(self.running)].tolist()
        row = 0
        while row < len(self.running):
            while not cache.reserve(row, lengths[row] + self.step_slots):
                victim = len(self.running) - 1
                if victim == 0:  # the scheduler admits no sequence that could outgrow the pool alone
                    raise RuntimeError("paged cache: one sequence alone needs more blocks than the pool has")
                seq = self.running[victim]
                seq.preemptions += 1
                self.preempted.append(seq)
                self._drop([victim])
                if victim == row:
                    return
            row += 1

    def _drop(self, rows: list[int]) -> None:
        """Take the sequences of `rows` out of the loop: release their rows, then move the other live
        rows to the front of the cache, of `running` and of the per-row state."""
        if not rows:
            return
        for r in rows:
            self.cache.release(r)
        gone = set(rows)
        live = [r for r in range(len(self.running)) if r not in gone]
        for dst, src in enumerate(live):
            if dst != src:
                self.cache.move_row(src, dst)
        self.running = [self.running[r] for r in live]
        self.sampling = self.sampling.select(live)
        self.state = self.state.select(torch.tensor(live, dtype=torch.long, device=self.state.pending.device)) \
            if live else None

    def stats(self, start: float, batch: int, ttft_s: float, n_tokens: int) -> GenerationStats:
        """The stats of a call that began at `start` (`time.perf_counter()`) and gave its `batch`
        prompts `n_tokens` new tokens in all, from everything this decoder ran since (prefill: the
        seconds spent admitting sequences)."""
        wall, prefill_s = time.perf_counter() - start, self.prefill_s
        c = self.counts
        steps = c.depth_steps
        depth = self.spec.depth if self.spec is not None else 0
        plain = self.spec is None
        return GenerationStats(
            tokens=n_tokens, verify_steps=self.steps, tau=c.emitted / c.row_steps if c.row_steps and not plain else 1.0,
            acceptance_per_position=c.acceptance_per_position(depth), tokens_per_s=n_tokens / wall,
            wall_s=wall, prefill_s=prefill_s, decode_s=wall - prefill_s, batch_size=batch,
            draft_acceptance_rate=c.accepted / c.drafted if c.drafted else 0.0, row_steps=c.row_steps,
            ttft_s=ttft_s, tpot_s=self.tpot,
            depth_steps=[] if plain else steps + [0] * (depth + 1 - len(steps)),
            rows_steps=[list(r) for r in c.rows_steps])
