"""Single steps of the decoding loop, set up from a loaded `Engine` for micro-benchmarks
(`bench/perf/` with pytest-benchmark on the CPU, `bench/gpu_bench.py` on CUDA).

The prompt batch is admitted once (`SpeculativeDecoder.admit`: verifier + MTP prefill), then each
call runs one phase of a step with `specdec.steps`' functions, as `decode_step` runs them: one
verifier forward over a draft tree, one plain decode step, one MTP draft, writing only scratch
cache slots beyond the committed length (the decode step's length bump is undone by `reset`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property, partial

import torch

from specdec import Engine, SpecConfig
from specdec.auto_tree import finished
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder
from specdec.steps import StepNoise, StepRows, StepShape
from specdec.steps import draft as draft_step
from specdec.steps import verify as verify_step
from specdec.tree import DraftTree, chain_tree, visible_slots

MAX_NODES = 32


def heap_tree(batch: int, n_nodes: int, vocab: int, device, seed: int = 0) -> DraftTree:
    """A binary draft tree of `n_nodes` nodes per row (node i's parent is (i-1)//2, root 0), random tokens.

    n_nodes = 1 is a one-token chain. Verification cost depends on the node count, hardly on the shape.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (batch, n_nodes), generator=g).to(device)
    if n_nodes == 1:
        return chain_tree(tokens)
    idx = torch.arange(1, n_nodes + 1)
    parents = ((idx - 1) // 2).expand(batch, n_nodes).clone().to(device)
    depths = torch.floor(torch.log2(idx.float() + 1)).long().expand(batch, n_nodes).clone().to(device)
    return DraftTree(tokens, parents, depths)


@dataclass
class StepBench:
    """A prefilled batch and the calls that time one step each."""

    eng: Engine
    decoder: SpeculativeDecoder
    cache: object
    lengths: torch.Tensor  # committed lengths after prefill (copied back by `reset`)
    pending: torch.Tensor
    draft_logits: torch.Tensor
    draft_hidden: torch.Tensor

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @torch.inference_mode()
    def reset(self) -> None:
        self.cache.lengths[: self.batch] = self.lengths

    @cached_property
    def rows(self) -> StepRows:
        """The batch's greedy step inputs (`lengths`: a view of the pool's, so `reset` applies)."""
        zeros = torch.zeros(self.batch, device=self.lengths.device)
        return StepRows(self.cache.lengths[: self.batch], self.pending, self.draft_logits, self.draft_hidden,
                        zeros, zeros + 1.0)

    @cached_property
    def longest(self) -> int:
        """The longest admitted context (committed tokens)."""
        return int(self.lengths.max())

    @torch.inference_mode()
    def verify(self, tree: DraftTree):
        """One verifier forward over the root and the tree's nodes (what a speculative step verifies)."""
        n_nodes = tree.tokens.shape[1]
        shape = StepShape(1, 1) if n_nodes == 1 else StepShape(n_nodes, 2, n_nodes)
        view = self.cache.step_view(self.longest + n_nodes + 1)
        return verify_step(self.eng.run_verifier, view, self.rows, tree, shape)

    @torch.inference_mode()
    def decode(self):
        """One plain decode step (one token per row); call `reset` before the next."""
        return self.eng.decode_step(self.cache, self.pending, self.batch)

    @torch.inference_mode()
    def draft(self, spec: SpecConfig) -> DraftTree:
        """One MTP drafting phase of shape `spec` (chain or tree), greedy, as a step drafts."""
        shape = StepShape(spec.depth, spec.topk, spec.n_nodes, draft_vocab=spec.draft_vocab)
        view = self.cache.step_view(self.longest + spec.draft_slots)
        return draft_step(self.eng.run_drafter, view, self.rows, shape, StepNoise(None))

    @torch.inference_mode()
    def mtp_forward(self):
        """One MTP layer forward over one token per row (a chain's depth >= 2 draft)."""
        lengths = self.cache.lengths[: self.batch]
        pos = lengths.unsqueeze(1)
        mask = (torch.arange(int(pos.max()) + 1, device=pos.device)[None, :] <= pos).unsqueeze(1)
        tokens = self.draft_logits.argmax(-1, keepdim=True)
        return self.eng.drafter(tokens, self.draft_hidden.unsqueeze(1), pos, self.cache.kv[:, : self.batch],
                                self.cache.pe[:, : self.batch], pos, mask)


def admitted(eng: Engine, ids: list[list[int]], spec: SpecConfig, room: int, temperature: float = 0.0,
             top_p: float = 1.0) -> SpeculativeDecoder:
    """A decoder of `spec` with `ids` admitted (one row each, an unbounded budget: the verifier and
    MTP prefill), in a pool with `room` slots past the longest for the steps to write."""
    decoder = SpeculativeDecoder(eng, spec, temperature, top_p, 0)
    decoder.use_cache(eng.cache_for(len(ids), max(map(len, ids)) + room))
    decoder.admit([Sequence(p, 1 << 30, temperature, top_p, 0, r) for r, p in enumerate(ids)])
    return decoder


@torch.inference_mode()
def prepare(eng: Engine, ids: list[list[int]], room: int = MAX_NODES + 8) -> StepBench:
    """Admit `ids` (`admitted`); leave `room` scratch slots."""
    decoder = admitted(eng, ids, SpecConfig(depth=1, adaptive=False), room)
    cache, state = decoder.cache, decoder.state
    return StepBench(eng, decoder, cache, cache.lengths[: len(ids)].clone(), state.pending, state.draft_logits,
                     state.draft_hidden)


@torch.inference_mode()
def verify_costs(eng: Engine, ids: list[list[int]], widths: list[int], rounds: int = 20,
                 seed: int = 0) -> dict[int, float]:
    """Median seconds of one verifier forward over `w` tokens per row, for each `w` in `widths`.

    The batch `ids` (one row each) is prefilled once; each forward writes scratch slots past the
    prompts (random tokens; only slots, not the lengths, change) under a causal mask over the whole
    cache pool, as a greedy step verifies. It runs `eng.run_verifier`, so with `--compile` the
    compiled forward (the first two calls of each width compile and warm up, untimed). Rounds
    interleave the widths, so drift of a shared CPU reaches all of them alike.
    """
    cache = eng.cache_for(len(ids), max(map(len, ids)) + max(widths))
    tokens, lengths = eng.pad(ids)
    eng.prefill(cache, tokens, lengths)
    generator = torch.Generator().manual_seed(seed)
    calls = {}
    for w in sorted(set(widths)):
        drafts = torch.randint(3, eng.args.vocab_size, (len(ids), w), generator=generator).to(eng.device)
        pos = lengths.unsqueeze(1) + torch.arange(w, device=eng.device)
        mask = visible_slots(lengths, w, cache.kv.shape[2])
        calls[w] = partial(eng.run_verifier, drafts, pos, cache.kv, cache.pe, pos, mask)
    return dict(zip(calls, _interleaved_medians(list(calls.values()), rounds)))


def _interleaved_medians(calls: list[Callable[[], object]], rounds: int) -> list[float]:
    """Median seconds of each call: two untimed calls each (compile, warm up), then `rounds` rounds
    that run every call once in turn, so drift of a shared CPU reaches all of them alike."""
    for call in calls:
        call(), call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for t, call in zip(times, calls):
            start = time.perf_counter()
            finished(call())
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def decoder_step_costs(eng: Engine, ids: list[list[int]], specs: list[SpecConfig], temperature: float = 0.0,
                     top_p: float = 1.0, rounds: int = 20) -> tuple[float, list[float]]:
    """Median seconds of one plain step and of one chain step for each chain `specs[i]` (topk 1,
    one-hot drafts; its depth pinned) as `SpeculativeDecoder.step` runs them, at `temperature`/`top_p`
    (`specdec.steps.decode_step`, compiled whole with `--compile`).

    These steps run the decoder's own `advance`, the step of `step` (a plain step: the verifier
    over the pending token and its draw; a chain step: draft → verify → accept → commit, the MTP
    layer over the verified pairs included), each ending with the
    host reads of what it emits, but not the emitting, retiring and policy bookkeeping around them.
    The batch `ids` is admitted once (verifier + MTP prefill); every step starts from that state
    (the lengths are restored, writes land in scratch slots past the prompts). Rounds interleave
    the steps; the first two calls of each warm up, untimed.
    """
    if eng.drafter is None:
        raise ValueError("decoder_step_costs needs an engine with an MTP drafter")
    room = max((s.depth for s in specs), default=0) + 1
    vocabs = {s.draft_vocab for s in specs}
    base = admitted(eng, ids, SpecConfig(depth=room - 1 if specs else 1, adaptive=False,
                                         draft_vocab=vocabs.pop() if len(vocabs) == 1 else None),
                    room, temperature, top_p)
    cache, state, rows = base.cache, base.state, len(base.running)
    start_lengths = cache.lengths[:rows].clone()

    def lengths() -> torch.Tensor:
        cache.lengths[:rows] = start_lengths
        return cache.lengths[:rows]

    def pinned(spec: SpecConfig) -> SpeculativeDecoder:
        dec = SpeculativeDecoder(eng, replace(spec, adaptive=False), temperature, top_p, 0)
        dec.cache, dec.running, dec.sampling = cache, base.running, base.sampling
        return dec

    def step(dec: SpeculativeDecoder, depth: int) -> None:
        dec.advance(cache, lengths(), state, depth)

    try:
        medians = _interleaved_medians([partial(step, base, 0)] + [partial(step, pinned(s), s.depth) for s in specs],
                                       rounds)
    finally:
        cache.lengths[:rows] = start_lengths
    return medians[0], medians[1:]
