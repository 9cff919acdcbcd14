"""Drafted tokens verified in one verifier forward, against the same tokens decoded one at a time.

`verified_and_decoded` gives both sets of logits. The batch-invariant mode promises they are equal
bit for bit (so greedy MTP and plain greedy decoding pick the same tokens in any dtype); with the
usual kernels they differ by rounding (tests/test_batch_invariant.py, bench/gpu_bench.py invariant).
"""

from __future__ import annotations

import torch

from specdec.cache import LatentCache
from specdec.model.transformer import Transformer
from specdec.tree import ancestor_matrix, tree_attention_mask, visible_slots


def _path(parents: list[int], node: int) -> list[int]:
    """Nodes from the root (0) to `node`, root first; `parents[i - 1]` is node i's parent."""
    path = [node]
    while path[-1] != 0:
        path.append(parents[path[-1] - 1])
    return path[::-1]


def verified_and_decoded(model: Transformer, prompt: list[int], nodes: list[int],
                         parents: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(verified, decoded) float32 logits `[N+1, V]` of the root and N draft nodes after `prompt`.

    `nodes[0]` is the root (the token decoded next), `nodes[i]` node i, whose parent is
    `parents[i - 1]` (None: a chain, node i's parent is i - 1). Verified: one forward over every
    node at slots L..L+N with the tree mask, as `specdec.steps.verify` runs it. Decoded: for each
    node, its path decoded one token per forward from the prefilled cache, as plain decoding runs it.
    """
    n = len(nodes) - 1
    parents = list(range(n)) if parents is None else parents
    length, n_slots = len(prompt), len(prompt) + len(nodes)
    device = model.lm_head.weight.device
    cache = LatentCache(model.args, model.args.n_layers, 1, n_slots, model.dtype, device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        tensor = lambda rows: torch.tensor(rows, device=device)  # noqa: E731
        positions = torch.arange(length, device=device).unsqueeze(0)
        model(tensor([prompt]), positions, cache.kv, cache.pe, positions, visible_slots(zero, length, n_slots))
        prefilled = cache.kv.clone(), cache.pe.clone()
        lengths = tensor([length])
        depths = tensor([[len(_path(parents, i)) - 1 for i in range(n + 1)]])
        slots = length + torch.arange(n + 1, device=device).unsqueeze(0)
        mask = tree_attention_mask(lengths, ancestor_matrix(tensor([parents])), n_slots)
        verified = model(tensor([nodes]), length + depths, cache.kv, cache.pe, slots, mask).logits[0]
        decoded = []
        for node in range(n + 1):
            cache.kv.copy_(prefilled[0])
            cache.pe.copy_(prefilled[1])
            for depth, step in enumerate(_path(parents, node)):
                at = tensor([[length + depth]])
                logits = model(tensor([[nodes[step]]]), at, cache.kv, cache.pe, at,
                               visible_slots(lengths + depth, 1, n_slots)).logits[0, 0]
            decoded.append(logits)
    return verified, torch.stack(decoded)
