"""Helper run under torchrun by test_distributed.py: the scheduler on rank 0, lockstep followers on the
others. Sequences join, leave, are preempted, chunked and cancelled while the adaptive depth changes;
each rank records what its copies of the sequences emitted (rank 0 writes them all to the JSON)."""

import json
import sys

import torch

from specdec import Engine, SpecConfig
from specdec.distributed import exit_rank, shutdown
from specdec.scheduler import Scheduler
from specdec.sequence import Sequence
from tests.test_speculative import random_prompts

ckpt, out_file = sys.argv[1], sys.argv[2]
eng = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_seq_len=128)
prompts = random_prompts(eng.args.vocab_size, [9, 6, 23, 7, 31, 8], seed=41)
settings = [(0.0, 1.0, 0), (0.9, 1.0, 5), (0.0, 1.0, 0), (0.8, 0.9, 6), (0.0, 1.0, 0), (1.1, 1.0, 7)]
CANCELLED = 1  # its client goes away after 3 tokens

sched = Scheduler(eng, SpecConfig(depth=3), max_rows=4, prefill_tokens=8, cache_tokens=96, block_size=8)
seen: list[Sequence] = []  # this rank's copies, in order of first admission (first come, first served)
admit, start_prefill = sched.decoder.admit, sched.decoder.start_prefill


def record(seqs):
    seen.extend(s for s in seqs if all(s is not t for t in seen))


sched.decoder.admit = lambda seqs: (record(seqs), admit(seqs))[1]
sched.decoder.start_prefill = lambda seq: (record([seq]), start_prefill(seq))[1]

with torch.inference_mode():
    if sched.following:
        sched.follow()
    else:
        seqs = [Sequence(p, 30, t, tp, sd) for p, (t, tp, sd) in zip(prompts, settings)]
        seqs[CANCELLED].on_tokens = lambda s, kept: sched.finish(s, "cancelled") if len(s.output) >= 3 else None
        sched.generate_all(seqs, timeout_s=600)
        sched.close()
    alone = [eng.generate([p], max_new_tokens=30, temperature=t, top_p=tp, seed=sd).token_ids[0]
             for p, (t, tp, sd) in zip(prompts, settings)]

outputs = [[s.output, s.finish_reason, s.preemptions] for s in seen]
gathered = [None] * eng.ctx.world_size
if eng.ctx.world_size > 1:
    torch.distributed.all_gather_object(gathered, outputs)
else:
    gathered = [outputs]
if eng.ctx.rank == 0:
    with open(out_file, "w") as f:
        json.dump({"world_size": eng.ctx.world_size, "ranks": gathered, "alone": alone,
                   "prompt_lens": [len(s.prompt) for s in seen], "preemptions": sched.preemptions,
                   "depth_steps": sched.decoder.counts.depth_steps}, f)
shutdown(wait_for_peers=True)
exit_rank(0)  # without the interpreter's teardown, where a rank sometimes aborted
