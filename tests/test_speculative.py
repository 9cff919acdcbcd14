"""MTP speculative decoding (chain): lossless greedy and sampled output, the MTP forward, the cache."""

from __future__ import annotations

import math

import pytest
import torch

import specdec.acceptance
import specdec.steps
from specdec.model.errors import ConfigError
from specdec import Engine, SpecConfig
from specdec.sampling import probabilities
from specdec.speculative import SpeculativeDecoder
from specdec.tree import chain_tree


@pytest.fixture(scope="module")
def eng(f32_engine):
    return f32_engine


@pytest.fixture(scope="module")
def tiny(tiny_engine):
    return tiny_engine


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3 if vocab > 8 else 0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_same_or_tie(engine: Engine, prompts, spec_out, plain_out) -> int:
    """Spec == plain token for token, except at a proven numerical tie (plain's top-2 gap < 1e-4).

    Returns the number of rows that diverged at a tie.
    """
    ties = 0
    for p, s, q in zip(prompts, spec_out, plain_out):
        if s == q:
            continue
        k = next(i for i, (a, b) in enumerate(zip(s, q)) if a != b)
        logits = engine.logits([p + q[:k]])[0, -1]
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-4, f"divergence at step {k} without a tie: {s[:k + 1]} vs {q[:k + 1]}"
        ties += 1
    return ties


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_plain(eng, tiny, depth, batch):
    ties = 0
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11, 5][:batch], seed=depth * 10 + batch)
        plain = engine.generate(prompts, max_new_tokens=24).token_ids
        spec = engine.generate(prompts, max_new_tokens=24, spec=SpecConfig(depth=depth, adaptive=False))
        ties += assert_same_or_tie(engine, prompts, spec.token_ids, plain)
        assert spec.stats.tokens == sum(map(len, spec.token_ids))
        assert len(spec.stats.acceptance_per_position) == depth
    assert ties <= 1


@pytest.mark.parametrize("spec", [SpecConfig(depth=3, draft_vocab=5), SpecConfig(depth=2, topk=2, draft_vocab=5)])
def test_draft_vocabulary_subset_is_lossless_greedy(eng, tiny, spec):
    """Drafting among the lowest ids only (small vocabularies: 5 of 8, 5 of 512) changes no token."""
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11], seed=5)
        plain = engine.generate(prompts, max_new_tokens=20).token_ids
        out = engine.generate(prompts, max_new_tokens=20, spec=spec)
        assert assert_same_or_tie(engine, prompts, out.token_ids, plain) == 0


def test_draft_vocabulary_restricts_drafts(tiny):
    """Drafts really come from the subset: with 1 allowed id every drafted token is id 0."""
    dec = SpeculativeDecoder(tiny, SpecConfig(depth=2, draft_vocab=1, adaptive=False), 0.0, 1.0, 0)
    results = []
    dec.observer = results.append
    tiny.schedule(dec, random_prompts(8, [5, 6], seed=2), 6)
    assert results and all((r.tree.tokens == 0).all() for r in results)
    for r in results:
        assert torch.isinf(r.draft_logits[:, 1:]).all() and torch.isfinite(r.draft_logits[:, :1]).all()


def test_tiny_vocab_drafts_are_really_accepted(tiny):
    """Guard for the test above: acceptance paths are exercised (random 8-token drafts often match)."""
    prompts = random_prompts(8, [4, 6, 9, 5], seed=0)
    out = tiny.generate(prompts, max_new_tokens=30, spec=SpecConfig(depth=2, adaptive=False))  # depth pinned: no timing
    assert out.stats.acceptance_per_position[0] > 0.05 and out.stats.tau > 1.0


def test_hidden_state_options_are_also_lossless(tiny):
    prompts = random_prompts(8, [4, 6, 9], seed=1)
    plain = tiny.generate(prompts, max_new_tokens=16).token_ids
    for vh in ("normed", "prenorm"):
        for dh in ("normed", "prenorm"):
            spec = SpecConfig(depth=3, verifier_hidden_kind=vh, draft_hidden_kind=dh)
            assert assert_same_or_tie(tiny, prompts, tiny.generate(prompts, max_new_tokens=16, spec=spec).token_ids,
                                      plain) == 0


def draft_oracle(monkeypatch, dec: SpeculativeDecoder, truth: list[list[int]]) -> None:
    """Make `dec`'s steps draft the known plain continuation, corrupting every 3rd drafted position:
    long accepted runs, rejections at every depth, and the real MTP layer still refreshed at every commit."""
    calls = 0

    def draft(drafter, cache, rows, shape, noise):
        nonlocal calls
        drafts = []
        for seq in dec.running:  # prompt r is stream r of the call
            done = len(seq.output)
            future = truth[seq.stream][done:done + shape.depth]
            future = future + [0] * (shape.depth - len(future))
            calls += 1
            if calls % 3 == 0:
                j = calls % shape.depth
                future[j] = (future[j] + 1) % 8
            drafts.append(future)
        return chain_tree(torch.tensor(drafts))

    monkeypatch.setattr(specdec.steps, "draft", draft)


def test_long_accepted_runs_stay_lossless(eng, monkeypatch):
    prompts = random_prompts(eng.args.vocab_size, [7, 3, 11, 5], seed=5)
    plain = eng.generate(prompts, max_new_tokens=30).token_ids
    dec = SpeculativeDecoder(eng, SpecConfig(depth=4, adaptive=False), 0.0, 1.0, 0)
    draft_oracle(monkeypatch, dec, plain)
    out, stats = eng.schedule(dec, prompts, 30)
    assert assert_same_or_tie(eng, prompts, out, plain) == 0
    assert stats.tau > 2.0 and stats.acceptance_per_position[3] > 0.2


def assert_cache_equals_from_scratch(engine: Engine, spec: SpecConfig, max_new_tokens: int) -> None:
    """Decode one prompt speculatively, then check its verifier and MTP cache rows against one verifier
    prefill over the committed tokens followed by one MTP pass over the pairs (h_i, x_{i+1})."""
    prompt = random_prompts(engine.args.vocab_size, [9], seed=7)
    out = engine.generate(prompt, max_new_tokens=max_new_tokens, spec=spec)
    cache, n_layers = engine.latent_cache, engine.args.n_layers
    length = int(cache.lengths[0])
    seq = prompt[0] + out.token_ids[0]
    assert length == len(seq) - 1  # the last emitted token is pending, not yet in the verifier cache
    tokens = torch.tensor([seq[:length]])
    pos = torch.arange(length).unsqueeze(0)
    mask = pos.unsqueeze(-1) >= pos.unsqueeze(1)
    kv = torch.zeros(n_layers + 1, 1, length, engine.args.kv_lora_rank)
    pe = torch.zeros(n_layers + 1, 1, length, engine.args.qk_rope_head_dim)
    with torch.inference_mode():
        ver = engine.model(tokens, pos, kv, pe, pos, mask)
        engine.drafter(torch.tensor([seq[1:length + 1]]), ver.hidden, pos, kv, pe, pos, mask)
    torch.testing.assert_close(cache.kv[:, 0, :length], kv[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.pe[:, 0, :length], pe[:, 0], rtol=1e-4, atol=1e-5)


def test_refreshed_mtp_cache_equals_from_scratch_pass(eng):
    assert_cache_equals_from_scratch(eng, SpecConfig(depth=3, adaptive=False), 20)


def test_mtp_forward_matches_independent_implementation(eng, f32_ckpt):
    """Straightforward MTP: concat order, norms, RoPE positions, with transformers' decoder layer as the block."""
    from safetensors import safe_open
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer,
                                                                      DeepseekV3RotaryEmbedding)
    import json

    cfg = json.loads((f32_ckpt / "config.json").read_text())
    hf_cfg = DeepseekV3Config(**cfg)
    L = cfg["num_hidden_layers"]
    weights = {}
    for shard in f32_ckpt.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    block = DeepseekV3DecoderLayer(hf_cfg, layer_idx=L).eval()
    prefix = f"model.layers.{L}."
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    sd = {}
    for k in block.state_dict():
        if k == "mlp.experts.gate_up_proj":
            sd[k] = torch.stack([torch.cat([own[f"mlp.experts.{e}.gate_proj.weight"],
                                            own[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(8)])
        elif k == "mlp.experts.down_proj":
            sd[k] = torch.stack([own[f"mlp.experts.{e}.down_proj.weight"] for e in range(8)])
        else:
            sd[k] = own[k]
    block.load_state_dict(sd)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    g = torch.Generator().manual_seed(0)
    T = 6
    hidden = torch.randn(1, T, 256, generator=g)
    next_tokens = torch.randint(3, 512, (1, T), generator=g)
    emb = weights["model.embed_tokens.weight"][next_tokens]
    x = torch.cat([rms(emb, own["enorm.weight"]), rms(hidden, own["hnorm.weight"])], dim=-1) @ own["eh_proj.weight"].T
    pos = torch.arange(3, 3 + T).unsqueeze(0)  # MTP positions need not start at 0
    cos_sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    causal = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T)
    with torch.no_grad():
        g_ref = block(x, attention_mask=causal, position_embeddings=cos_sin, position_ids=pos)
        g_ref = g_ref[0] if isinstance(g_ref, tuple) else g_ref
    logits_ref = rms(g_ref, own["shared_head.norm.weight"]) @ own["shared_head.head.weight"].T

    kv = torch.zeros(L + 1, 1, 16, 128)
    pe = torch.zeros(L + 1, 1, 16, 32)
    slots = pos - 3  # fresh cache: this test's positions live in slots 0..T-1
    mask = slots.unsqueeze(-1) >= slots.unsqueeze(1)
    with torch.inference_mode():
        out = eng.drafter(next_tokens, hidden, pos, kv, pe, slots, mask)
    torch.testing.assert_close(out.prenorm, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, logits_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- distribution (lossless sampling)

def exact_joint(engine: Engine, prompt: list[int], n: int, temperature: float, top_p: float) -> torch.Tensor:
    """P(first n tokens) under plain sampling, `[V] * n`, from the verifier's logits of every prefix."""
    V = engine.args.vocab_size
    joint = torch.ones([1])
    prefixes = [[]]
    for _ in range(n):
        logits = engine.logits([prompt + p for p in prefixes])
        last = logits[:, len(prompt) + len(prefixes[0]) - 1]
        probs = probabilities(last, temperature, top_p)
        joint = (joint.view(-1, 1) * probs).flatten()
        prefixes = [p + [t] for p in prefixes for t in range(V)]
    return joint.view([V] * n)


def sample_joint(engine: Engine, prompt: list[int], n: int, rows: int, spec, temperature, top_p, seed) -> torch.Tensor:
    out = engine.generate([prompt] * rows, max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed,
                          spec=spec)
    V = engine.args.vocab_size
    counts = torch.zeros([V] * n)
    for toks in out.token_ids:
        counts[tuple(toks)] += 1
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, p≈0.001 critical value); cells with expected < 5 are pooled into one."""
    total = counts.sum()
    expected = probs.flatten().double() * total
    counts = counts.flatten().double()
    assert counts[expected == 0].sum() == 0, "a sample fell where the verifier gives probability 0"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    z = 3.09  # one-sided 0.001, Wilson–Hilferty
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat, crit


@pytest.mark.parametrize("mode, temperature, top_p, draft_vocab", [
    ("onehot", 1.0, 1.0, None), ("sample", 1.0, 1.0, None), ("onehot", 0.8, 0.85, None), ("sample", 1.0, 0.9, None),
    ("sample", 1.0, 1.0, 5)])  # drafts from 5 of the 8 ids: q is 0 elsewhere, the residual covers the rest
def test_sampled_joint_distribution_matches_plain(tiny, mode, temperature, top_p, draft_vocab):
    prompt = [3, 5, 2, 7]
    spec = SpecConfig(depth=2, draft_mode=mode, draft_vocab=draft_vocab, adaptive=False)
    counts = sample_joint(tiny, prompt, 3, 6000, spec, temperature, top_p, seed=11)
    probs = exact_joint(tiny, prompt, 3, temperature, top_p)
    stat, crit = chi_square(counts, probs)
    assert stat < crit, (stat, crit)


def test_biased_acceptance_rules_are_detected(tiny, monkeypatch):
    """The same test fails for a deliberately wrong residual and for always-accept one-hot drafts."""
    prompt = [3, 5, 2, 7]
    probs = exact_joint(tiny, prompt, 3, 1.0, 1.0)
    monkeypatch.setattr(specdec.acceptance, "residual_distribution", lambda p, q: p)  # ignores q
    counts = sample_joint(tiny, prompt, 3, 6000, SpecConfig(depth=2, draft_mode="sample", adaptive=False), 1.0,
                          1.0, seed=11)
    stat, crit = chi_square(counts, probs)
    assert stat > crit, (stat, crit)
    monkeypatch.undo()

    def always_accept_first_chain(drafts, target):  # the chain fast path, biased the same way
        acc = specdec.acceptance.accept_chain(drafts, target)
        n = acc.n_accepted.clamp_min(1)
        return specdec.acceptance.Acceptance(n, acc.path, target.gather(1, n.unsqueeze(1))[:, 0])

    monkeypatch.setattr(specdec.steps, "accept_chain", always_accept_first_chain)
    counts = sample_joint(tiny, prompt, 3, 6000, SpecConfig(depth=2, draft_mode="onehot", adaptive=False), 1.0,
                          1.0, seed=11)
    stat, crit = chi_square(counts, probs)
    assert stat > crit, (stat, crit)


# ---------------------------------------------------------------- bad input

def test_bad_spec_configs():
    with pytest.raises(ConfigError, match="depth"):
        SpecConfig(depth=0)
    with pytest.raises(ConfigError, match="draft mode"):
        SpecConfig(draft_mode="greedy")
    with pytest.raises(ConfigError, match="full tree"):
        SpecConfig(depth=2, topk=2, nodes=7)
    with pytest.raises(ConfigError, match="tree nodes"):
        SpecConfig(depth=3, topk=2, nodes=2)
    with pytest.raises(ConfigError, match="draft vocabulary"):
        SpecConfig(depth=2, topk=3, draft_vocab=2)


def test_spec_on_checkpoint_without_mtp_layer(tmp_path):
    from specdec.model.synthetic import small_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "nomtp", small_config(num_nextn_predict_layers=0), fp8=False)
    engine = Engine.from_pretrained(ckpt, device="cpu", max_seq_len=32)
    assert engine.drafter is None
    with pytest.raises(ConfigError, match="no MTP layer"):
        engine.generate([[4, 5]], max_new_tokens=2, spec=SpecConfig(depth=1))
