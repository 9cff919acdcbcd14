"""MTP speculative decoding, one step top-down: draft → verify → accept → commit.

State per active row b (cache rows are kept as a prefix 0..B-1 of the shared latent pool):
  * `cache.lengths[b]` = L: verifier cache holds tokens x_0..x_{L-1};
  * `pending[b]` = x_L: the last emitted token, not yet in the verifier cache;
  * the MTP cache holds positions 0..L-1, each from a *verifier* hidden state (pair (h_i, x_{i+1}));
  * `draft_logits[b]`, `draft_hidden[b]`: the MTP output at position L-1, i.e. the first draft's
    distribution (for x_{L+1}) and the hidden state that seeds depth 2.

One step:
  1. Draft: a chain d_1..d_K (d_1 from draft_logits; depth k ≥ 2 runs the MTP layer at position
     L+k-2 on its own previous hidden and d_{k-1}) or a tree (`mtp.tree_draft`), writing scratch
     MTP rows only.
  2. Verify: one verifier forward over the root x_L and the N draft nodes: node i at position
     L + depth(i), cache slot L + i, attending to the committed prefix and its ancestors.
  3. Accept: a path of a nodes survives plus one verifier token (bonus or correction), cut at EOS
     and at the budget (`specdec.acceptance`).
  4. Commit: the accepted path's verifier rows move to slots L+1..L+a (a chain is already in
     place); the new length L+a+1 is the commit, so everything else is rolled back by the length
     alone. The MTP layer then runs over the newly committed pairs (h_{L+j}, x_{L+j+1}),
     j = 0..a, from the verifier's states, overwriting its scratch rows; its output at the last
     pair is the next step's first-draft distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model.transformer import ForwardOutput
from mtp.tree_draft import expand_tree
from specdec.acceptance import Acceptance, accept_chain, accept_greedy, accept_onehot, accept_sampled, cut_run
from specdec.adaptive import SpeculationPolicy
from specdec.cache import LatentCache
from specdec.config import GenerationStats
from specdec.sampling import draw, draw_at, position_uniforms, probabilities, sample
from specdec.tree import DraftTree, ancestor_matrix, chain_tree, tree_attention_mask, visible_slots


@dataclass
class AcceptanceCounts:
    """Running totals for the metrics over row-steps of any depth (0: a plain step).

    per_position[i]: row-steps whose first i+1 drafts were all accepted; drafted_at[i]: row-steps
    that drafted at least i+1 tokens; depth_steps[d]: steps (not row-steps) run at depth d."""

    row_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    per_position: list[int] = field(default_factory=list)
    drafted_at: list[int] = field(default_factory=list)
    depth_steps: list[int] = field(default_factory=list)

    def add(self, n_accepted: list[int], depth: int) -> None:
        grow = depth + 1 - len(self.depth_steps)
        if grow > 0:
            self.depth_steps += [0] * grow
            self.per_position += [0] * grow
            self.drafted_at += [0] * grow
        self.depth_steps[depth] += 1
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


@dataclass
class RowState:
    """Per-row loop state between steps (B live rows, cache rows 0..B-1).

    pending: `[B]` x_L. draft_logits `[B, V]` / draft_hidden `[B, dim]`: the MTP output at position
    L-1 (first draft's distribution, depth-2 seed); stale while `lag_tokens` is set.
    lag_hidden: w tensors `[B, 1, dim]` / lag_tokens: w tensors `[B, 1]`: the pairs (h_i, x_{i+1}),
    i = L-w..L-1, of the last w plain steps, which the MTP cache has not seen yet (kept as lists and
    joined once by `_catch_up`, so a plain stretch costs no growing copies).
    """

    pending: torch.Tensor
    draft_logits: torch.Tensor
    draft_hidden: torch.Tensor
    lag_hidden: list[torch.Tensor] = field(default_factory=list)
    lag_tokens: list[torch.Tensor] = field(default_factory=list)

    def select(self, index: torch.Tensor) -> "RowState":
        """The state of rows `index` (in that order)."""
        pick = lambda ts: [t.index_select(0, index) for t in ts]  # noqa: E731
        return RowState(self.pending.index_select(0, index), self.draft_logits.index_select(0, index),
                        self.draft_hidden.index_select(0, index), pick(self.lag_hidden), pick(self.lag_tokens))


class SpeculativeDecoder:
    """Runs the MTP speculative loop for one `generate` call (engine, settings, RNG, metrics).

    With `policy` (adaptive speculation, `specdec.adaptive`), each step's draft depth is chosen
    in 0..spec.depth, 0 being a plain step (verifier only); None: every step drafts `spec.depth`.
    """

    def __init__(self, engine, spec, temperature: float, top_p: float, seed: int,
                 policy: SpeculationPolicy | None = None) -> None:
        self.eng, self.spec = engine, spec
        self.model, self.drafter = engine.run_verifier, engine.run_drafter  # forwards (maybe compiled)
        self.temperature, self.top_p = temperature, top_p
        self.seed = seed  # token draws: u(seed, prompt, output position) (`specdec.sampling`)
        self.generator = torch.Generator(engine.device).manual_seed(seed)  # sampled drafts and their acceptance
        self.counts = AcceptanceCounts()
        self.policy = policy

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def generate(self, ids: list[list[int]], max_new_tokens: int):
        """Decode every prompt; returns (new tokens per prompt, GenerationStats)."""
        eng = self.eng
        start = time.perf_counter()
        batch = len(ids)
        cache = eng.cache_for(batch, max(map(len, ids)) + max_new_tokens + self.spec.draft_slots)
        self.outputs: list[list[int]] = [[] for _ in range(batch)]
        # cache row r holds prompt row row_of[r]: `_loop` keeps the live rows a prefix, the
        # compiled chain loop moves them only into a smaller pool (`shrunk_rows`)
        self.row_of = list(range(batch))
        state = self._prefill(cache, ids)
        prefill_s = time.perf_counter() - start
        live, _ = self._emit([[t] for t in state.pending.tolist()], self.row_of, max_new_tokens)
        self.step_start = time.perf_counter()
        ttft, self.tpot = self.step_start - start, []
        if (eng.run_chain_step is not None and self.temperature == 0.0 and self.spec.topk == 1
                and self.policy is None):
            steps = self._loop_greedy_chain_step(cache, live, state.pending, state.draft_logits, state.draft_hidden,
                                                 max_new_tokens)
        else:
            steps = self._loop(cache, live, state, max_new_tokens)
        return self.outputs, self._stats(steps, start, prefill_s, batch, ttft, self.tpot)

    def _loop(self, cache: LatentCache, live: list[int], state: RowState, max_new_tokens: int) -> int:
        """Steps until every row is finished; returns the number of steps."""
        steps = 0
        while live:
            state = self._compact(cache, live, state)
            rows = len(self.row_of)
            lengths = cache.lengths[:rows]
            depth = self.spec.depth
            if self.policy:  # timings differ per rank: rank 0's choice holds for all
                depth = self.eng.ctx.broadcast_int(self.policy.choose(rows), self.eng.device)
            if depth > 0:  # after plain steps: not part of this step's cost (see `_catch_up`)
                state = self._catch_up(cache, lengths, state)
            t0 = time.perf_counter()
            if depth == 0:                                                        # a plain step
                state = self._plain_step(cache, lengths, state)
                n_acc, runs = [0] * rows, [[t] for t in state.pending.tolist()]
            else:
                tree = self._draft(cache, lengths, state, depth)                  # 1. draft
                verified = self._verify(cache, lengths, state.pending, tree)      # 2. verify
                acc = self._accept(tree, verified.logits)                         # 3. accept
                state = self._commit(cache, tree, verified, acc)                  # 4. commit
                n_acc, bonus = acc.n_accepted.tolist(), acc.next_token.tolist()
                path_tokens = tree.tokens.gather(1, (acc.path - 1).clamp_min(0)).tolist()
                runs = [path_tokens[r][:a] + [bonus[r]] for r, a in enumerate(n_acc)]
            self.counts.add(n_acc, depth)
            live, kept = self._emit(runs, self.row_of, max_new_tokens)
            if self.policy:
                self.policy.observe(depth, rows, time.perf_counter() - t0, n_acc)
            self._time_step(kept)
            steps += 1
        return steps

    def _loop_greedy_chain_step(self, cache: LatentCache, live: list[int], pending: torch.Tensor,
                                draft_logits: torch.Tensor, draft_hidden: torch.Tensor, max_new_tokens: int) -> int:
        """`_loop` for greedy chains with `--compile`: each step (draft → verify → accept → commit) is
        one compiled graph (`run_chain_step`, `specdec.greedy_step.GreedyChainStep`).

        Finished rows are parked (length 0, `live_mask` 0) instead of compacted away, until at most
        half the rows are live: then those move into a pool of half as many rows (`shrunk_rows`).
        A step advances a row by everything it accepted, even past what its budget lets it keep, so
        a parked row's length must be reset, or its next writes could run past the pool. Returns
        the number of steps."""
        spec, run_step = self.spec, self.eng.run_chain_step
        live_mask = torch.zeros(len(self.row_of), dtype=torch.long, device=pending.device)
        live_mask[live] = 1
        first_draft = draft_logits.argmax(dim=-1)
        steps = 0
        while live:
            out = run_step(*cache.span(spec.depth + 1), cache.lengths, live_mask, pending, first_draft, draft_hidden,
                           spec.depth, spec.verifier_hidden, spec.draft_hidden, spec.draft_vocab)
            cache.lengths.copy_(out.lengths)
            # contiguous like the prefill's (a strided `pending` compiled a second graph per setting)
            pending, first_draft, draft_hidden = (t.contiguous() for t in (out.pending, out.first_draft,
                                                                              out.draft_hidden))
            emitted, n_acc = out.emitted.tolist(), out.n_accepted.tolist()
            self.counts.add([n_acc[r] for r in live], spec.depth)
            runs = [emitted[r][: n_acc[r] + 1] for r in live]
            still, kept = self._emit(runs, [self.row_of[r] for r in live], max_new_tokens)
            finished = [r for i, r in enumerate(live) if i not in still]
            if finished:  # parked: frozen at length 0, their writes stay in slots 0..K of their own row
                live_mask[finished] = 0
                cache.lengths[finished] = 0
            live = [live[i] for i in still]
            cache, live, self.row_of, (pending, first_draft, draft_hidden, live_mask) = self.eng.shrink_pool(
                cache, live, self.row_of, [pending, first_draft, draft_hidden, live_mask])
            self._time_step(kept)
            steps += 1
        return steps

    def _time_step(self, kept: list[int]) -> None:
        """Each token a row kept took the step's wall time over the tokens it kept (`tpot`)."""
        now = time.perf_counter()
        for n in kept:
            self.tpot.extend([(now - self.step_start) / n] * n)
        self.step_start = now

    # ------------------------------------------------------------------ steps

    def _prefill(self, cache: LatentCache, ids: list[list[int]]):
        """Verifier over the prompts, first token, then the MTP layer over (h_i, x_{i+1}) for i < P."""
        eng = self.eng
        tokens, lengths = eng.pad(ids)
        batch, width = tokens.shape
        pos = torch.arange(width, device=eng.device).expand(batch, width)
        mask = pos.unsqueeze(-1) >= pos.unsqueeze(1)
        kv, pe = cache.kv, cache.pe
        out = self.model(tokens, pos, kv, pe, pos, mask, (lengths - 1).unsqueeze(1))
        cache.lengths[:batch] = lengths
        first = sample(out.logits[:, 0], self.temperature, self.top_p, self.seed, list(range(batch)), [0] * batch)
        next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        next_tokens[torch.arange(batch), lengths - 1] = first
        mtp = self.drafter(next_tokens, self._verifier_hidden(out), pos, kv, pe, pos, mask, (lengths - 1).unsqueeze(1),
                           self.spec.draft_vocab)
        return RowState(first, mtp.logits[:, 0], mtp.hidden(self.spec.draft_hidden)[:, 0])

    def _plain_step(self, cache: LatentCache, lengths: torch.Tensor, state: RowState) -> RowState:
        """Depth 0: the verifier over x_L alone, then x_{L+1} sampled as plain decoding samples it.
        The MTP layer does not run: the pair (h_L, x_{L+1}) joins the lag for `_catch_up`."""
        slots = lengths.unsqueeze(1)
        out = self.model(state.pending.unsqueeze(1), slots, cache.kv, cache.pe, slots,
                         visible_slots(lengths, 1, int(lengths.max()) + 1))
        token = sample(out.logits[:, 0], self.temperature, self.top_p, self.seed, self.row_of,
                       [len(self.outputs[p]) for p in self.row_of])
        lengths += 1
        return RowState(token, state.draft_logits, state.draft_hidden, state.lag_hidden + [self._verifier_hidden(out)],
                        state.lag_tokens + [token.unsqueeze(1)])

    def _catch_up(self, cache: LatentCache, lengths: torch.Tensor, state: RowState) -> RowState:
        """After plain steps: the MTP layer over their w lagging pairs (positions L-w..L-1, one
        forward), which fills its cache rows and yields the first draft's distribution again.
        Its time is left out of the step costs the policy learns from: one batched forward for w
        tokens is small beside w plain steps, and counting it against the draft step that follows
        a plain stretch would make drafting look dearer the longer plain decoding ran."""
        if not state.lag_tokens:
            return state
        width = len(state.lag_tokens)
        first = lengths - width
        pos = first.unsqueeze(1) + torch.arange(width, device=lengths.device)
        mtp = self.drafter(torch.cat(state.lag_tokens, 1), torch.cat(state.lag_hidden, 1), pos, cache.kv, cache.pe, pos,
                           visible_slots(first, width, int(lengths.max())),
                           torch.full_like(lengths, width - 1).unsqueeze(1), self.spec.draft_vocab)
        return RowState(state.pending, mtp.logits[:, 0], mtp.hidden(self.spec.draft_hidden)[:, 0])

    def _draft(self, cache: LatentCache, lengths: torch.Tensor, state: RowState, depth: int) -> DraftTree:
        """A chain of `depth` drafts (topk 1) or an MTP-expanded tree of drafts per row."""
        logits, hidden = state.draft_logits, state.draft_hidden
        if self.spec.topk > 1:
            sampled = self.temperature > 0 and self.spec.draft_mode == "sample"
            return expand_tree(self.drafter, cache.kv, cache.pe, lengths, logits, hidden,
                               depth, self.spec.topk, self.spec.n_nodes, sampled, self.temperature,
                               self.top_p, self.spec.draft_hidden, self.generator, self.spec.draft_vocab)
        return self._draft_chain(cache, lengths, logits, hidden, depth)

    def _draft_chain(self, cache: LatentCache, lengths: torch.Tensor, logits: torch.Tensor,
                     hidden: torch.Tensor, depth: int) -> DraftTree:
        """`depth` drafts per row: d_1 from the committed MTP output, d_k (k ≥ 2) from MTP at position L+k-2."""
        tokens, probs = [], []
        for k in range(1, depth + 1):
            if k > 1:
                pos = (lengths + k - 2).unsqueeze(1)
                mask = visible_slots(pos[:, 0], 1, int(pos.max()) + 1)
                out = self.drafter(tokens[-1].unsqueeze(1), hidden.unsqueeze(1), pos, cache.kv, cache.pe, pos, mask,
                                   draft_vocab=self.spec.draft_vocab)
                logits, hidden = out.logits[:, 0], out.hidden(self.spec.draft_hidden)[:, 0]
            token, q = self._draft_token(logits)
            tokens.append(token)
            probs.append(q)
        child_probs = None
        if probs[0] is not None:  # node j's children were drawn from the q of depth j+1; leaves have none
            child_probs = torch.stack(probs + [torch.zeros_like(probs[0])], dim=1)
        return chain_tree(torch.stack(tokens, 1), child_probs)

    def _draft_token(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MTP argmax (greedy / one-hot drafts) or a draw from q (sampled drafts, q returned)."""
        if self.temperature == 0.0 or self.spec.draft_mode == "onehot":
            return logits.argmax(dim=-1), None
        q = probabilities(logits, self.temperature, self.top_p)
        return draw(q, self.generator), q

    def _verify(self, cache: LatentCache, lengths: torch.Tensor, pending: torch.Tensor,
                tree: DraftTree) -> ForwardOutput:
        """One verifier forward over the root and the N nodes (positions L + depth, slots L..L+N, tree mask)."""
        tokens = tree.all_tokens(pending)
        batch, width = tokens.shape
        slots = lengths.unsqueeze(1) + torch.arange(width, device=tokens.device)
        if self.spec.topk == 1:  # a chain: positions are the slots, the tree mask is causal
            return self.model(tokens, slots, cache.kv, cache.pe, slots,
                              visible_slots(lengths, width, int(lengths.max()) + width))
        pos = lengths.unsqueeze(1) + tree.all_depths()
        mask = tree_attention_mask(lengths, ancestor_matrix(tree.parents), int(lengths.max()) + width)
        return self.model(tokens, pos, cache.kv, cache.pe, slots, mask)

    def _accept(self, tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
        chain = self.spec.topk == 1
        if self.temperature == 0.0:
            return accept_chain(tree.tokens, target_logits.argmax(-1)) if chain else accept_greedy(tree, target_logits)
        p = probabilities(target_logits, self.temperature, self.top_p)
        if tree.child_probs is None:  # one-hot: node i's draw is the one output token L'+depth(i) would get
            done = [len(self.outputs[r]) for r in self.row_of]
            depths = tree.all_depths().tolist()
            u = position_uniforms(self.seed, self.row_of, [[n + d for d in row] for n, row in zip(done, depths)])
            y = draw_at(p, u)
            return accept_chain(tree.tokens, y) if chain else accept_onehot(tree, p, draws=y)
        return accept_sampled(tree, p, self.generator)

    def _commit(self, cache: LatentCache, tree: DraftTree, verified: ForwardOutput, acc: Acceptance):
        """Compact the accepted path, set the new lengths, refresh the MTP rows from verifier states."""
        batch, depth = acc.path.shape
        lengths = cache.lengths[:batch]
        rows = torch.arange(batch, device=lengths.device)
        for j in range(1, depth + 1 if self.spec.topk > 1 else 1):  # node j → slot L+j (a chain's are in place)
            live = acc.n_accepted >= j
            src = lengths + acc.path[:, j - 1]
            dst = lengths + j
            move = live & (src != dst)
            if move.any():
                r, s, d = rows[move], src[move], dst[move]
                cache.kv[:, r, d] = cache.kv[:, r, s]
                cache.pe[:, r, d] = cache.pe[:, r, s]
        # pair j = (h at path node j, token of path node j+1), j = 0..a; the verifier's token at j = a
        nodes = torch.cat([torch.zeros_like(acc.path[:, :1]), acc.path], dim=1)  # [B, depth+1], root first
        width = depth + 1
        hidden = self._verifier_hidden(verified)
        hidden = hidden.gather(1, nodes.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        next_tokens = torch.cat([tree.tokens.gather(1, (acc.path - 1).clamp_min(0)), acc.next_token.unsqueeze(1)], 1)
        next_tokens[rows, acc.n_accepted] = acc.next_token
        pos = lengths.unsqueeze(1) + torch.arange(width, device=lengths.device)
        mask = visible_slots(lengths, width, int(lengths.max()) + width)
        mtp = self.drafter(next_tokens, hidden, pos, cache.kv, cache.pe, pos, mask,
                           acc.n_accepted.unsqueeze(1), self.spec.draft_vocab)
        cache.lengths[:batch] += acc.n_accepted + 1
        return RowState(acc.next_token, mtp.logits[:, 0], mtp.hidden(self.spec.draft_hidden)[:, 0])

    # ------------------------------------------------------------------ bookkeeping

    def _verifier_hidden(self, out: ForwardOutput) -> torch.Tensor:
        return out.hidden if self.spec.verifier_hidden == "normed" else out.hidden_prenorm

    def _emit(self, runs: list[list[int]], prompt_rows: list[int], max_new: int) -> tuple[list[int], list[int]]:
        """Append run i to the output of prompt row `prompt_rows[i]`, cut at EOS (kept) and at the
        budget; return the indices i still live and how many tokens each run kept."""
        live, n_kept = [], []
        for r, run in enumerate(runs):
            out = self.outputs[prompt_rows[r]]
            kept, finished = cut_run(run, self.eng.eos_ids, max_new - len(out))
            out.extend(kept)
            n_kept.append(len(kept))
            if not finished:
                live.append(r)
        return live, n_kept

    def _compact(self, cache: LatentCache, live: list[int], state: RowState) -> RowState:
        """Move live rows to the front of the cache, of `row_of` and of the per-row state."""
        if live == list(range(len(self.row_of))):
            return state
        for dst, src in enumerate(live):
            if dst != src:
                cache.move_row(src, dst)
        self.row_of = [self.row_of[r] for r in live]
        return state.select(torch.tensor(live, device=state.pending.device))

    def _stats(self, steps: int, start: float, prefill_s: float, batch: int, ttft_s: float,
               tpot_s: list[float]) -> GenerationStats:
        wall = time.perf_counter() - start
        c = self.counts
        n_tokens = sum(map(len, self.outputs))
        return GenerationStats(
            tokens=n_tokens, verify_steps=steps, tau=c.emitted / c.row_steps if c.row_steps else 1.0,
            acceptance_per_position=c.acceptance_per_position(self.spec.depth), tokens_per_s=n_tokens / wall,
            wall_s=wall, prefill_s=prefill_s, decode_s=wall - prefill_s, batch_size=batch,
            draft_acceptance_rate=c.accepted / c.drafted if c.drafted else 0.0, row_steps=c.row_steps,
            ttft_s=ttft_s, tpot_s=tpot_s, depth_steps=c.depth_steps + [0] * (self.spec.depth + 1 - len(c.depth_steps)))
