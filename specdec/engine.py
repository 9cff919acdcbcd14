"""`Engine`: load a checkpoint once, then generate for batches of prompts.

Plain and MTP speculative decoding run the one decoding loop of `specdec.speculative` (sequences
join, each step runs the live rows, finished rows leave; a speculative step is draft → verify →
accept → commit, a plain step the verifier alone), driven by the scheduler a server uses
(`specdec.scheduler`: every prompt queued, rows refilled as they finish when `max_batch` caps
them); each step is `specdec.steps.decode_step`, compiled whole with `--compile`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Sequence

import torch

from specdec.kernels import fp8_cache
from specdec.kernels.cpu_gemm import GemmTuner, machine_key, measure_enabled
from specdec.model.errors import ConfigError
from specdec.model.load import load_verifier
from specdec.model.parallel import ParallelContext
from specdec.model.transformer import Transformer
from specdec.mtp.drafter import MTPDrafter, has_mtp_layer, load_drafter
from specdec.adaptive import SpeculationPolicy, StepCosts, default_cost_path
from specdec.cache import SPAN_MULTIPLE, LatentCache
from specdec.config import GenerationOutput, GenerationStats, SpecConfig
from specdec.compiled import CompiledDecode, check_compile_supported
from specdec.graphs import Capture, GraphedSteps
from specdec.defaults import default_model_path
from specdec.distributed import bind_device, default_device, init_parallel
from specdec.scheduler import Scheduler
from specdec import sequence as sequences
from specdec.speculative import SpeculativeDecoder
from specdec.steps import decode_step
from specdec.tokenizer import load_tokenizer
from specdec.tree import visible_slots


class Engine:
    """A loaded verifier (+ tokenizer) on this rank, ready to generate.

    Build with `Engine.from_pretrained`; `generate` and `logits` are the API of DESIGN.md §5.
    """

    def __init__(self, model: Transformer, drafter: MTPDrafter | None, tokenizer, ctx: ParallelContext,
                 device: torch.device, checkpoint: Path, notice: str | None = None,
                 compiled: CompiledDecode | None = None, kv_cache_dtype: str = "auto") -> None:
        self.kv_cache_dtype = kv_cache_dtype  # latent cache format: "auto" (compute dtype) or "fp8"
        self.model, self.drafter, self.tokenizer, self.ctx, self.device = model, drafter, tokenizer, ctx, device
        self.compiled = compiled
        # the forwards every decoding step calls (same signatures as the modules' forward; compiled
        # ones pad rows to the whole cache pool, so callers always pass the whole pool)
        self.run_verifier = compiled.verifier if compiled else model
        self.run_drafter = compiled.draft if compiled and drafter is not None else drafter
        # one decoding step (`specdec.steps.decode_step`), compiled whole with `--compile`
        self.run_step = compiled.step if compiled else functools.partial(decode_step, model, drafter)
        self.args = model.args
        self.checkpoint = checkpoint
        self.notice = notice  # said once to the user (e.g. "random weights")
        self.max_seq_len = model.max_seq_len
        eos = set(self.args.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self._cache: LatentCache | None = None
        config = checkpoint / "config.json"  # which checkpoint step costs were measured on (read once)
        digest = hashlib.sha1(config.read_bytes()).hexdigest()[:12] if config.is_file() else "?"
        self.checkpoint_id = f"{checkpoint.resolve()} {digest}"
        self.cost_tables: dict[str, StepCosts] = {}  # adaptive speculation's measured step costs
        self.policies: dict[str, SpeculationPolicy] = {}  # and its policy (acceptance, choice), per cost key
        self.graphs: GraphedSteps | None = None  # CUDA graphs of the steps (`use_cuda_graphs`)

    def use_cuda_graphs(self, capture: Capture | None = None) -> None:
        """Run every decoding step as a replayed capture (`specdec.graphs`): on CUDA a CUDA graph per
        row bucket, span and step shape; `capture`: the tests' stand-in (`graphs.capture_by_rerun`).
        Raises ConfigError on an engine that is not on CUDA (without `capture`) or is compiled."""
        if capture is None and self.device.type != "cuda":
            raise ConfigError(f"--cuda-graphs needs a CUDA device (this engine runs on {self.device})")
        if self.compiled is not None:
            raise ConfigError("--cuda-graphs and --compile are exclusive: choose one")
        self.graphs = GraphedSteps(self.model, self.drafter, capture)
        self.run_step = self.graphs.step

    def check_spec(self, spec: SpecConfig) -> None:
        """Raise ConfigError unless this engine can decode with `spec`: it needs an MTP layer and a
        draft vocabulary within the drafter's."""
        if self.drafter is None:
            raise ConfigError(f"{self.checkpoint}: checkpoint has no MTP layer "
                              f"(model.layers.{self.args.n_layers}.*), so MTP speculative decoding is unavailable")
        self.drafter.check_draft_vocab(spec.draft_vocab)

    def adapts(self, spec: SpecConfig | None) -> bool:
        """Whether decoding with `spec` chooses each step's depth (`SpecConfig.adapts`); compiled
        steps choose between plain steps and `spec.depth` only (`policy_depths`)."""
        return spec is not None and spec.adapts

    def policy_depths(self, spec: SpecConfig) -> tuple[int, ...] | None:
        """The depths an adaptive policy may choose: with compiled steps plain or `spec.depth` (each
        depth compiles graphs of its own, per row bucket: ~30-120 s each on 2 cores), else any."""
        return (0, spec.depth) if self.compiled is not None else None

    @property
    def compilations(self) -> int:
        """Step graphs compiled (`--compile`) or captured (`--cuda-graphs`) so far: a step that
        raised it compiled or captured one, and its time says nothing of a step's cost."""
        if self.compiled is not None:
            return self.compiled.compilations
        return self.graphs.captures if self.graphs is not None else 0

    def span_for(self, n_slots: int) -> int:
        """Slots a step that needs `n_slots` is given: as many, or with CUDA graphs the span its
        capture covers (`GraphedSteps.span`: few spans, few captures)."""
        return n_slots if self.graphs is None else self.graphs.span(n_slots)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int = 4096,
        keep_fp8: bool | None = None,
        show_progress: bool = False,
        compile: bool = False,
        tune: bool | GemmTuner | None = None,
        kv_cache_dtype: str = "auto",
        cuda_graphs: bool = False,
        batch_invariant: str | None = None,
    ) -> "Engine":
        """Load the checkpoint at `path` (None: the embedded default model) for this rank.

        Under torchrun the process group is joined here (gloo on CPU, nccl on CUDA) and each rank
        reads only its slices. `dtype` defaults to float32 on CPU and bfloat16 on CUDA. `compile`:
        run the decode-step forwards through `torch.compile` (`specdec.compiled`; CPU, one process).
        `tune`: on the CPU, time the GEMM formulations of every weight shape on this machine and use
        the fastest (`kernels.cpu_gemm`; verdicts cached in `~/.cache/specdec`); False: the default
        formulation; None: on unless `SPECDEC_TUNE=0`; a `GemmTuner`: that one (e.g. to re-time).
        `kv_cache_dtype`: "auto" keeps cached latents in `dtype`; "fp8" as e4m3 codes with one float32
        scale per token (`kernels.fp8_cache`: about half of bf16's cache bytes). `cuda_graphs`:
        replay every decoding step from a CUDA graph (`use_cuda_graphs`; CUDA only). `batch_invariant`:
        None, or which batch-invariant kernels to run ("auto": Triton on CUDA, one torch call per row
        elsewhere; "torch"; "triton", on the CPU under TRITON_INTERPRET=1): a token's logits are then
        bitwise the same whether decoded alone or verified among drafted tokens, so greedy MTP output
        equals plain greedy output in any dtype (`model.prepare.prepare_batch_invariant`; FP8 weights
        included; not with `compile`).
        """
        if kv_cache_dtype not in fp8_cache.KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(fp8_cache.KV_CACHE_DTYPES)}, "
                              f"got {kv_cache_dtype!r}")
        device = bind_device(torch.device(device) if device is not None else default_device())
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if cuda_graphs and (device.type != "cuda" or compile):  # said before loading anything
            raise ConfigError(f"--cuda-graphs needs a CUDA device (this engine runs on {device})"
                              if device.type != "cuda" else "--cuda-graphs and --compile are exclusive: choose one")
        if batch_invariant is not None and compile:
            raise ConfigError("--batch-invariant and --compile are exclusive: choose one")
        ctx = init_parallel(device)
        if batch_invariant is not None:
            ctx = dataclasses.replace(ctx, ordered_sums=True)
        notice = None
        if path is None:
            path, notice = default_model_path(ctx)
        path = Path(path)
        if max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be >= 2, got {max_seq_len}")
        tuner = None
        if device.type == "cpu":
            tuner = tune if isinstance(tune, GemmTuner) else GemmTuner(dtype, measure=tune)
        model, reader = load_verifier(path, ctx, device, dtype, max_seq_len, keep_fp8, show_progress, tuner,
                                      batch_invariant)
        drafter = None
        if has_mtp_layer(reader, model.args.n_layers):
            drafter = load_drafter(model, reader, device, model.fp8_block, show_progress, tuner, batch_invariant)
        tokenizer = load_tokenizer(path)
        compiled = None
        if compile:
            check_compile_supported(model, ctx, device)
            compiled = CompiledDecode(model, drafter)
        engine = cls(model, drafter, tokenizer, ctx, device, path, notice, compiled, kv_cache_dtype)
        if cuda_graphs:
            engine.use_cuda_graphs()
        return engine

    def describe_drafter(self) -> str:
        """One line on the MTP drafter: present or not, and which tensors it shares with the verifier."""
        if self.drafter is None:
            return f"no MTP layer in {self.checkpoint}: plain decoding only"
        shared = [name for name, same in (("embedding", self.drafter.shares_embedding),
                                          ("head", self.drafter.shares_head)) if same]
        reuse = (f"reusing the verifier's {' and '.join(shared)} (the checkpoint's copies are identical)"
                 if shared else "with its own embedding and head")
        return f"MTP drafter: layer {self.drafter.cache_layer}, {reuse}"

    # ------------------------------------------------------------------ inputs

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids of each prompt (strings tokenized as given, no chat template, no BOS added)."""
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ConfigError("prompts must be a non-empty list of strings or of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ConfigError(f"prompt {i} is empty")
            if min(ids) < 0 or max(ids) >= self.args.vocab_size:
                raise ConfigError(f"prompt {i} has token ids outside [0, {self.args.vocab_size})")
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def latent_cache(self) -> LatentCache | None:
        """The shared latent pool as the last call left it (None before any: see `cache_for`)."""
        return self._cache

    def release_cache(self) -> None:
        """Drop the shared latent pool and its memory; the next call allocates one afresh."""
        self._cache = None

    def cache_for(self, batch: int, seq_len: int) -> LatentCache:
        """The shared latent cache, grown (reallocated) only when a call needs more rows or slots.

        Compiled steps run over buckets of the pool's rows (`specdec.compiled.row_bucket`), so then
        it has exactly `batch` rows, and one spare block of slots: a compiled step gets a view of
        fewer slots than the pool (`LatentCache.step_view`), and a view that covered the whole
        (contiguous) pool would compile a second graph."""
        old = self._cache
        rows = batch if self.compiled is not None else max(batch, old.batch if old else 0)
        seq_len += SPAN_MULTIPLE if self.compiled is not None else 0
        if old is None or old.batch != rows or old.seq_len < seq_len:
            slots = max(seq_len, old.seq_len if old else 0)
            self._cache = None
            self._cache = LatentCache(self.args, self.args.n_layers + self.args.n_mtp_layers, rows, slots,
                                      self.model.dtype, self.device, self.kv_cache_dtype)
        return self._cache

    # ------------------------------------------------------------------ API

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Verifier logits `[B, T, vocab]` float32 for every position (ragged rows right-padded with zeros)."""
        ids = self.encode(token_ids)
        longest = max(map(len, ids))
        self._check_length(longest, 0)
        cache = self.cache_for(len(ids), longest)
        tokens, lengths = self.pad(ids)
        out = self.prefill(cache, tokens, lengths, all_logits=True)
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        return out.masked_fill(~valid.unsqueeze(-1), 0.0)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        spec: SpecConfig | None = None,
        max_batch: int | None = None,
    ) -> GenerationOutput:
        """Generate up to `max_new_tokens` per prompt; greedy at temperature 0, else sampled (seeded).

        `spec`: MTP speculative decoding with this draft shape (None: plain decoding). Output is the
        same as plain decoding's: token for token when greedy, in distribution when sampled.
        `max_batch`: rows decoded at once (None: every prompt at once); the other prompts wait and
        join as rows finish (continuous batching: `specdec.scheduler.Scheduler` runs every call).
        Prompt i draws from stream i of `seed` either way.
        """
        if spec is not None:
            self.check_spec(spec)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        ids = self.encode(prompts)
        draft_slots = spec.draft_slots if spec is not None else 0  # a step writes beyond the last token
        for i, p in enumerate(ids):
            self._check_length(len(p), max_new_tokens, i, draft_slots)
        policy = self.policy_for(spec, temperature > 0) if self.adapts(spec) else None
        decoder = SpeculativeDecoder(self, spec, temperature, top_p, seed, policy)
        outputs, stats = self.schedule(decoder, ids, max_new_tokens, max_batch)
        if policy is not None:
            policy.costs.save()
        return GenerationOutput(outputs, [self.decode(o) for o in outputs], stats)

    @torch.inference_mode()
    def schedule(self, decoder: SpeculativeDecoder, ids: list[list[int]], max_new_tokens: int,
                 max_batch: int | None = None) -> tuple[list[list[int]], GenerationStats]:
        """Decode token ids `ids` (prompt r: stream r of the decoder's seed) with a fresh `decoder`
        through a scheduler over this engine's dense pool: all prompts queued, the first `max_batch`
        (None: all) admitted together, the others as rows free up. Returns each prompt's new tokens
        and the call's stats (TTFT: until every row admitted in the first round has its first token).
        `generate` checks its inputs and builds the decoder; tests pass their own."""
        start = time.perf_counter()
        rows = len(ids) if max_batch is None else min(max_batch, len(ids))
        draft_slots = decoder.spec.draft_slots if decoder.spec is not None else 0
        decoder.use_cache(self.cache_for(rows, max(map(len, ids)) + max_new_tokens + draft_slots))
        seqs = [sequences.Sequence(p, max_new_tokens, decoder.temperature, decoder.top_p, decoder.seed, r)
                for r, p in enumerate(ids)]
        # prefill budget: every prompt the rows take fits in one round (none is cut into chunks)
        Scheduler.for_batch(self, decoder, rows, len(seqs), sum(map(len, ids))).generate_all(seqs)
        ttft = max(s.first_token_s for s in seqs[:rows]) - start
        return [s.output for s in seqs], decoder.stats(start, len(ids), ttft, sum(len(s.output) for s in seqs))

    def step_costs(self, spec: SpecConfig, sampled: bool = False) -> StepCosts:
        """The measured step costs adaptive speculation uses with `spec`'s drafter settings on this
        engine, greedy or `sampled` (a sampled step costs more: distributions, draws): one table per
        setting, kept for the engine's life and on disk between runs
        (`~/.cache/specdec/step_costs.json`, keyed by machine, checkpoint and settings). Assign
        `engine.cost_tables[key]` (key: `cost_key(spec, sampled)`) to impose costs (tests)."""
        key = self.cost_key(spec, sampled)
        if key not in self.cost_tables:
            self.cost_tables[key] = StepCosts(default_cost_path() if measure_enabled() else None, key)
        return self.cost_tables[key]

    def policy_for(self, spec: SpecConfig, sampled: bool = False) -> SpeculationPolicy:
        """The adaptive policy for `spec`'s settings, kept for the engine's life: each call continues
        from the acceptance, choices and revisit clock of the calls before it (a policy for another
        depth limit starts anew from the acceptance seen so far)."""
        key = self.cost_key(spec, sampled)
        policy = self.policies.get(key)
        if policy is None or policy.max_depth != spec.depth:
            seen = policy.acceptance if policy is not None else None
            policy = self.policies[key] = SpeculationPolicy(spec.depth, self.step_costs(spec, sampled),
                                                            acceptance=seen, depths=self.policy_depths(spec))
        policy.costs = self.step_costs(spec, sampled)  # tests may have imposed a table since
        return policy

    def cost_key(self, spec: SpecConfig, sampled: bool = False) -> str:
        """What a step's cost (and the acceptance) depends on besides depth and rows."""
        mode = f"sampled {spec.draft_mode}" if sampled else "greedy"
        steps = "compiled" if self.compiled is not None else "graphs" if self.graphs is not None else "eager"
        return (f"{machine_key(self.model.dtype)} | {self.device} | world {self.ctx.world_size} | "
                f"{self.checkpoint_id} | fp8 {self.model.fp8_block is not None} | cache {self.kv_cache_dtype} | {mode} | "
                f"steps {steps} | "
                f"draft_vocab {spec.draft_vocab} | hidden {spec.verifier_hidden_kind}/{spec.draft_hidden_kind}")

    def prefill(self, cache: LatentCache, tokens: torch.Tensor, lengths: torch.Tensor,
                 all_logits: bool = False) -> torch.Tensor:
        """Run right-padded prompts `[B, T]` through the verifier from slot 0.

        Returns the last prompt token's logits `[B, V]` (or all `[B, T, V]` when `all_logits`).
        """
        batch, width = tokens.shape
        pos = torch.arange(width, device=self.device).expand(batch, width)
        causal = pos.unsqueeze(-1) >= pos.unsqueeze(1)  # [B, T, T]: token t sees slots ≤ t
        logits_at = None if all_logits else (lengths - 1).unsqueeze(1)
        out = self.run_verifier(tokens, pos, cache.kv, cache.pe, pos, causal, logits_at)
        cache.lengths[:batch] = lengths
        return out.logits if all_logits else out.logits[:, 0]

    def decode_step(self, cache: LatentCache, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """Append one token per active row (rows 0..batch-1) and return next-token logits `[batch, V]`."""
        lengths = cache.lengths[:batch]
        slots = lengths.unsqueeze(1)  # [B, 1]: the new token's slot (= its position)
        mask = visible_slots(lengths, 1, int(lengths.max()) + 1)
        out = self.run_verifier(tokens.unsqueeze(1), slots, cache.kv, cache.pe, slots, mask)
        cache.lengths[:batch] += 1
        return out.logits[:, -1]

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, ids))
        tokens = torch.zeros(len(ids), width, dtype=torch.long)
        for i, p in enumerate(ids):
            tokens[i, : len(p)] = torch.tensor(p)
        return tokens.to(self.device), torch.tensor([len(p) for p in ids], device=self.device)

    def _check_length(self, prompt_len: int, max_new_tokens: int, index: int = 0, draft_slots: int = 0) -> None:
        if prompt_len + max_new_tokens + draft_slots > self.max_seq_len:
            drafts = f" + {draft_slots} draft slots" if draft_slots else ""
            raise ConfigError(
                f"prompt {index} has {prompt_len} tokens; with max_new_tokens={max_new_tokens}{drafts} that "
                f"exceeds the maximum sequence length {self.max_seq_len}")
