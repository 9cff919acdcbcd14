"""What a `generate` call is asked for and what it reports: `SpecConfig`, `GenerationStats`,
`GenerationOutput` (a module of their own, so the engine and the loops share them without a cycle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from specdec.model.errors import ConfigError


@dataclass(frozen=True)
class SpecConfig:
    """How the MTP drafter drafts.

    depth: draft depth K (chain length, or tree depth).
    topk: children per expanded node (1: a chain). nodes: draft nodes verified per step (trees;
        default topk × depth; between depth and the full tree's topk + (depth-1)·topk²).
    draft_mode: "onehot" drafts one token per position: the MTP argmax for a greedy row, for a
        sampling row the draw of the MTP distribution q coupled to the verifier's (the same race
        noise, `specdec.sampling`), accepted when the verifier draws it: output = plain decoding's,
        seed for seed; "sample" draws drafts from q with their own noise, accepted by speculative
        sampling (temperature > 0 only; greedy decoding always drafts the argmax).
    verifier_hidden_kind: which verifier state feeds the MTP layer: "normed" (after model.norm, the
        head's input) or "prenorm" (the last block's output).
    draft_hidden_kind: which MTP state feeds the next depth: "normed" (after shared_head.norm) or "prenorm".
    draft_vocab: the drafter proposes only token ids below this (None: the whole vocabulary); its
        head then reads that many rows instead of all (see `MTPDrafter.forward`). Lossless either way.
    adaptive: for chains (topk 1), choose each step's depth in 0..depth (0: a
        plain step, no drafter) from step costs measured on this machine and the running
        acceptance (`specdec.adaptive`); False pins every step to `depth`. Trees are always pinned
        (see `adapts` for sampled drafts).
    """

    depth: int = 3
    topk: int = 1
    nodes: int | None = None
    draft_mode: str = "onehot"
    verifier_hidden_kind: str = "normed"
    draft_hidden_kind: str = "normed"
    draft_vocab: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.draft_vocab is not None and self.draft_vocab < max(self.topk, 1):
            raise ConfigError(f"draft vocabulary ({self.draft_vocab}) must be >= tree topk ({self.topk})")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError(f"draft depth must be an integer >= 1, got {self.depth}")
        if self.topk < 1:
            raise ConfigError(f"tree topk must be >= 1, got {self.topk}")
        if self.nodes is not None and self.nodes < self.depth:
            raise ConfigError(f"tree nodes ({self.nodes}) must be >= draft depth ({self.depth})")
        full = self.topk + (self.depth - 1) * self.topk * self.topk
        if self.nodes is not None and self.nodes > full:
            raise ConfigError(f"tree nodes ({self.nodes}) exceed the full tree of depth {self.depth} and topk "
                              f"{self.topk} ({full} nodes)")
        for name, value, allowed in (("draft mode", self.draft_mode, ("onehot", "sample")),
                                     ("verifier hidden", self.verifier_hidden_kind, ("normed", "prenorm")),
                                     ("draft hidden", self.draft_hidden_kind, ("normed", "prenorm"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    @property
    def adapts(self) -> bool:
        """Whether the depth is chosen per step: an adaptive chain. With one-hot drafts a seeded
        sampled output is plain sampling's whatever the depths. With sampled drafts it follows the
        same distribution, but its tokens depend on how the steps split the output (the draws for
        drafts and their acceptance come from one sequential generator), so with adaptive depths,
        which follow timings, a seed does not reproduce them; `adaptive=False` pins the depth and
        makes them reproducible."""
        return self.adaptive and self.topk == 1

    @property
    def n_nodes(self) -> int:
        """Draft nodes verified per step (the chain's depth when topk is 1)."""
        if self.topk == 1:
            return self.depth
        return self.nodes if self.nodes is not None else self.topk * self.depth

    @property
    def draft_slots(self) -> int:
        """Cache slots a step may write beyond the committed length (verified nodes, MTP scratch rows)."""
        return max(self.n_nodes + 1, (self.depth - 1) * self.topk + 1)


@dataclass
class GenerationStats:
    """Metrics of one `generate` call (names as in vLLM/SGLang so numbers compare).

    tokens: new tokens emitted over all rows. verify_steps: verifier forwards after prefill.
    tau: tokens per verifier forward and row (accepted drafts + 1, before EOS/budget cuts; 1 when plain
        or when no verify step ran).
    acceptance_per_position: share of row-steps whose first i+1 drafted tokens were all accepted ([] plain).
    draft_acceptance_rate: accepted drafts / drafted tokens. row_steps: verify steps summed over rows.
    tokens_per_s: tokens / wall_s. wall_s: seconds for the whole call (prefill included).
    prefill_s: seconds of the prefill forward; decode_s: seconds after it.
    ttft_s: seconds from the call to the first new token of every row (prefill + first sample).
    tpot_s: one entry per new token after each row's first: the seconds it took, i.e. the wall time
        of the step that produced it divided by the tokens that step gave its row (for p50/p90).
    depth_steps: steps run at each draft depth, [d] for depth d (0: plain steps of an adaptive
        run); [] for plain decoding.
    rows_steps: [d][r] steps run at depth d over r live rows (plain decoding too: depth 0).
    acceptance_per_position[i] counts only the row-steps that drafted at least i+1 tokens.
    """

    tokens: int = 0
    verify_steps: int = 0
    tau: float = 0.0
    acceptance_per_position: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0
    draft_acceptance_rate: float = 0.0
    row_steps: int = 0
    ttft_s: float = 0.0
    tpot_s: list[float] = field(default_factory=list)
    depth_steps: list[int] = field(default_factory=list)
    rows_steps: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationOutput:
    """token_ids[i]: new tokens of prompt i (EOS included when it ended the row); texts[i]: their text."""

    token_ids: list[list[int]]
    texts: list[str]
    stats: GenerationStats


