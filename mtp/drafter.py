"""The MTP drafter: DeepSeek-V3's multi-token-prediction module turned into a draft model.

At position i it combines the verifier's hidden state h_i with the embedding of the next token
t_{i+1} and predicts t_{i+2}:

    x = eh_proj(cat([enorm(embed(t_{i+1})), hnorm(h_i)]))      (embedding first, as released)
    g = Block(x) at RoPE position i, over the MTP layer's own latent cache
    logits = head(shared_head.norm(g))

Depth > 1 feeds the module its own output hidden state (normed or pre-norm, the caller's choice)
and its own draft token.
The MTP layer's cache is layer `n_layers` of the shared latent pool; rows computed from verifier
hidden states are committed, rows computed while drafting are scratch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from specdec.model.checkpoint import CheckpointReader, load_state
from specdec.model.errors import CheckpointError, ConfigError
from specdec.model.mtp_layer import MTPLayer
from specdec.kernels.cpu_gemm import GemmTuner
from specdec.model.prepare import prepare_backend
from specdec.model.transformer import Transformer

HiddenChoice = Literal["normed", "prenorm"]  # which hidden state feeds the (next) MTP step


class MTPOutput(NamedTuple):
    """One MTP pass's results.

    prenorm: `[B, T, dim]` the block output g. normed: `shared_head.norm(g)` (the head's input).
    logits: `[B, T, vocab]` float32.
    """

    prenorm: torch.Tensor
    normed: torch.Tensor
    logits: torch.Tensor

    def hidden(self, choice: HiddenChoice) -> torch.Tensor:
        """The hidden state fed to the next depth: "normed" or "prenorm"."""
        return self.normed if choice == "normed" else self.prenorm


class MTPDrafter(nn.Module):
    """One MTP layer bound to the verifier whose embedding/head it may share.

    Args:
        layer: the loaded MTP layer weights.
        main: the verifier (its RoPE tables, and its embedding/head when the checkpoint's copies are equal).
        cache_layer: index of this layer in the shared latent cache pool (= n_layers for the first MTP layer).
    """

    def __init__(self, layer: MTPLayer, main: Transformer, cache_layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.main = [main]  # not a submodule: the verifier is owned by the engine
        self.cache_layer = cache_layer

    @property
    def shares_embedding(self) -> bool:
        return self.layer.embed_tokens is None

    @property
    def shares_head(self) -> bool:
        return self.layer.shared_head.head is None

    def forward(
        self,
        next_tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        write_slots: torch.Tensor,
        attn_mask: torch.Tensor,
        logits_at: torch.Tensor | None = None,
        draft_vocab: int | None = None,
        block_table: torch.Tensor | None = None,
    ) -> MTPOutput:
        """One MTP pass over T positions per row.

        Args:
            next_tokens: `[B, T]` t_{i+1} for each position i.
            hidden: `[B, T, dim]` h_i (verifier hidden for committed rows, own output while drafting).
            positions: `[B, T]` RoPE position i.
            kv_cache / pe_cache: the whole pool `[n_pool_layers, ≥B, S, ·]`; this layer uses `cache_layer`, rows 0..B-1.
            write_slots: `[B, T]` cache slot of position i (= i).
            attn_mask: `[B, T, S_kv]` bool.
            logits_at: optional `[B, K]` int64 indices into T: hidden states and logits only there
                (`[B, K, ·]`), which spares the head (a full-vocabulary GEMM) its unused rows.
            draft_vocab: draft only among token ids `< draft_vocab` (one process): the head reads
                just those rows and the other logits are -inf. Byte-level BPE numbers tokens in
                merge order, so low ids are the frequent ones (FR-Spec's frequency-ranked draft
                vocabulary). Verification is untouched, so decoding stays lossless.
            block_table: a paged pool's block table (see `Transformer.forward`), None for a dense pool.
        """
        main = self.main[0]
        embed = main.model.embed_tokens if self.shares_embedding else self.layer.embed_tokens
        x = torch.cat([self.layer.enorm(embed(next_tokens)), self.layer.hnorm(hidden)], dim=-1)
        x = self.layer.eh_proj(x)
        rope = main.rope_cis[positions]
        g = self.layer(x, rope, kv_cache, pe_cache, self.cache_layer, write_slots, attn_mask, block_table)
        if logits_at is not None:
            g = g.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, g.shape[-1]))
        normed = self.layer.shared_head.norm(g)
        return MTPOutput(g, normed, self._head(normed, draft_vocab))

    @property
    def head(self):
        """The vocabulary projection the MTP layer uses (the verifier's when shared)."""
        return self.main[0].lm_head if self.shares_head else self.layer.shared_head.head

    def check_draft_vocab(self, draft_vocab: int | None) -> None:
        """Raise ConfigError when drafting among the first `draft_vocab` ids is impossible here."""
        main = self.main[0]
        if draft_vocab is None or draft_vocab >= main.args.vocab_size:
            return
        if main.ctx.world_size > 1:
            raise ConfigError("a draft vocabulary subset (draft_vocab) needs one process; the head is "
                              f"split over {main.ctx.world_size} ranks")
        if self.head.weight_scale_inv is not None:
            raise ConfigError("a draft vocabulary subset (draft_vocab) needs an unquantised MTP head")

    def _head(self, normed: torch.Tensor, draft_vocab: int | None) -> torch.Tensor:
        """Full-vocabulary float32 logits `[..., vocab]`, computed only for ids `< draft_vocab` when given."""
        main = self.main[0]
        vocab = main.args.vocab_size
        if draft_vocab is None or draft_vocab >= vocab:
            return main.ctx.all_gather_last_dim(self.head(normed).float())
        self.check_draft_vocab(draft_vocab)
        logits = self.head(normed, out_features=draft_vocab).float()
        return torch.nn.functional.pad(logits, (0, vocab - draft_vocab), value=float("-inf"))


def has_mtp_layer(reader: CheckpointReader, n_layers: int) -> bool:
    """Whether the checkpoint stores an MTP module at `model.layers.{n_layers}`."""
    return reader.has(f"model.layers.{n_layers}.eh_proj.weight")


def _same_as_main(reader: CheckpointReader, name: str, main_param: torch.Tensor, shard_start: int) -> bool:
    """Whether this rank's slice of checkpoint tensor `name` equals the verifier's loaded copy."""
    stored = reader.read(name, 0, shard_start, main_param.shape[0]) if not reader.presharded else reader.read(name)
    return stored.shape == main_param.shape and torch.equal(stored.to(main_param.dtype).to(main_param.device),
                                                            main_param)


def load_drafter(main: Transformer, reader: CheckpointReader, device: torch.device | str,
                 fp8_block: int | None, show_progress: bool = False,
                 tuner: GemmTuner | None = None, batch_invariant: str | None = None) -> MTPDrafter:
    """Load the first MTP layer of the checkpoint, sharded like the main layers.

    The MTP layer's `embed_tokens` and `shared_head.head` are duplicates of the main ones in the
    release; when this rank's slices are equal they are not loaded and the verifier's are used.
    `batch_invariant`: as the verifier's (`model.prepare.prepare_backend`).
    Raises CheckpointError when the checkpoint has no MTP layer.
    """
    args, ctx = main.args, main.ctx
    index = args.n_layers
    prefix = f"model.layers.{index}."
    if not has_mtp_layer(reader, index):
        raise CheckpointError(f"{reader.path}: checkpoint has no MTP layer ({prefix}* is absent)")
    with torch.device("meta"):
        layer = MTPLayer(index, args, ctx, main.dtype, fp8_block)
    if _same_as_main(reader, prefix + "embed_tokens.weight", main.model.embed_tokens.weight,
                     main.model.embed_tokens.shard_start):
        layer.embed_tokens = None  # removes its parameters from loading: the verifier's copy is used
    if _same_as_main(reader, prefix + "shared_head.head.weight", main.lm_head.weight, main.lm_head.shard_start):
        layer.shared_head.head = None
    load_state(layer, reader, prefix, device, show_progress and ctx.rank == 0, args.fp8_block_size or 128)
    prepare_backend(layer, device, tuner, (layer.shared_head.head,) if layer.shared_head.head else (), batch_invariant)
    return MTPDrafter(layer.eval(), main, cache_layer=index)

