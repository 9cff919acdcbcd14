"""Helper run under torchrun by test_distributed.py: dump verifier logits and greedy tokens (rank 0)."""

import json
import sys

import torch

from specdec import Engine, SpecConfig
from specdec.distributed import exit_rank, shutdown

ckpt, out_file = sys.argv[1], sys.argv[2]
eng = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_seq_len=64)
ids = [[5, 17, 300, 42, 9, 77], [8, 100, 3]]
logits = eng.logits(ids)
gen = eng.generate(ids, max_new_tokens=12)
gen24 = eng.generate(ids, max_new_tokens=24)
sampled = eng.generate(ids, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
spec_greedy = eng.generate(ids, max_new_tokens=12, spec=SpecConfig(depth=3, adaptive=False))
# adaptive: ranks time steps differently; rank 0's depth must hold everywhere (else collectives mismatch)
spec_adaptive = eng.generate(ids, max_new_tokens=24, spec=SpecConfig(depth=3))
spec_adaptive_sampled = eng.generate(ids, max_new_tokens=12, temperature=1.0, seed=7, spec=SpecConfig(depth=2))
spec_tree = eng.generate(ids, max_new_tokens=12, spec=SpecConfig(depth=3, topk=2, nodes=6))
spec_tree_sampled = eng.generate(ids, max_new_tokens=12, temperature=1.0, seed=7,
                                 spec=SpecConfig(depth=2, topk=2, draft_mode="sample"))
spec_sampled = eng.generate(ids, max_new_tokens=12, temperature=1.0, seed=7,
                            spec=SpecConfig(depth=2, draft_mode="sample", adaptive=False))
if eng.ctx.rank == 0:
    with open(out_file, "w") as f:
        json.dump({"world_size": eng.ctx.world_size, "logits": logits.tolist(), "greedy": gen.token_ids, "greedy24": gen24.token_ids,
                   "sampled": sampled.token_ids, "spec_greedy": spec_greedy.token_ids,
                   "spec_sampled": spec_sampled.token_ids, "spec_tree": spec_tree.token_ids,
                   "spec_tree_sampled": spec_tree_sampled.token_ids, "spec_adaptive": spec_adaptive.token_ids,
                   "adaptive_depth_steps": spec_adaptive.stats.depth_steps,
                   "spec_adaptive_sampled": spec_adaptive_sampled.token_ids}, f)
shutdown(wait_for_peers=True)
exit_rank(0)  # without the interpreter's teardown, where a rank sometimes aborted
