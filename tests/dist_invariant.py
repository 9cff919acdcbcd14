"""Helper run under torchrun by test_distributed.py: the batch-invariant mode over ranks (rank 0 writes).

Sums over ranks then run in rank order (`ParallelContext.ordered_sums`), so a verified chain's
logits still equal its tokens decoded one by one, bit for bit, and greedy MTP equals plain greedy."""

import json
import sys

import torch

from specdec import Engine, SpecConfig
from specdec.bench.invariance import verified_and_decoded
from specdec.distributed import exit_rank, shutdown

ckpt, out_file = sys.argv[1], sys.argv[2]
eng = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.bfloat16, max_seq_len=64, batch_invariant="auto")
verified, decoded = verified_and_decoded(eng.model, [5, 17, 300, 42, 9, 77], [8, 100, 3, 250, 4])
ids = [[5, 17, 300, 42, 9, 77], [8, 100, 3]]
plain = eng.generate(ids, max_new_tokens=12)
chain = eng.generate(ids, max_new_tokens=12, spec=SpecConfig(depth=3, adaptive=False))
if eng.ctx.rank == 0:
    with open(out_file, "w") as f:
        json.dump({"world_size": eng.ctx.world_size, "ordered_sums": eng.ctx.ordered_sums,
                   "logits_equal": torch.equal(verified, decoded), "plain": plain.token_ids,
                   "chain": chain.token_ids}, f)
shutdown(wait_for_peers=True)
exit_rank(0)  # without the interpreter's teardown, where a rank sometimes aborted
