"""`python -m specdec.bench soak`: many concurrent streams against the server for minutes; errors, cache and memory.

The server (`specdec.serve`'s app, adaptive MTP, over the loaded engine) runs on 127.0.0.1 in this
process with a paged cache small enough that the newest requests get preempted now and then. S
client threads each send streamed completions back to back until the time is up: greedy or
seeded-sampled, budgets of 8..max-new-tokens, some with a stop string, and one request in eight
dropped by its client after its first chunks (a cancel). Every few seconds a sample is taken:
this process's resident memory (VmRSS), requests running and waiting, cache blocks held.

Verdict (the bench exits 1 when one fails): no request got an error; once the clients stop, no
request runs or waits and every cache block is back; resident memory at the end is within
`--rss-slack` of the sample after the first quarter (allocator and caches settled).
"""

from __future__ import annotations

import json
import random
import threading
import time
from argparse import Namespace

import httpx

from specdec.bench import plots
from specdec.bench.common import BenchError, Report, Table, fmt
from specdec.bench.prompt_set import Prompt
from specdec.bench.serve import MODEL, _Served
from specdec import Engine, SpecConfig


def _rss_mb() -> float:
    """This process's resident memory in MiB (Linux: /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError("soak: /proc/self/status has no VmRSS (Linux only)")


class _Tally:
    """Requests finished, cancelled and failed, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = self.cancelled = self.tokens = 0
        self.errors: list[str] = []

    def add(self, tokens: int = 0, cancelled: bool = False, error: str | None = None) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error)
            elif cancelled:
                self.cancelled += 1
            else:
                self.done += 1
                self.tokens += tokens


def _client(url: str, prompts: list[str], max_new_tokens: int, until: float, seed: int, tally: _Tally) -> None:
    """Streamed requests back to back until `until` (time.monotonic()); each outcome goes to `tally`."""
    rng = random.Random(seed)
    with httpx.Client(timeout=600) as client:
        while time.monotonic() < until:
            body = {"model": MODEL, "prompt": rng.choice(prompts), "stream": True,
                    "max_tokens": rng.randint(min(8, max_new_tokens), max_new_tokens),
                    "temperature": rng.choice([0.0, 0.0, 0.8]), "seed": rng.randrange(1 << 30)}
            if rng.random() < 0.25:
                body["stop"] = ["\n\n"]
            drop_after = rng.randint(1, 3) if rng.random() < 0.125 else None
            try:
                chunks, tokens, ended = 0, 0, False
                with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        tally.add(error=f"HTTP {r.status_code}: {r.read()[:200]!r}")
                        continue
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            ended = True
                            break
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            raise RuntimeError(f"error event: {chunk['error']}")
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        chunks += 1
                        if drop_after is not None and chunks >= drop_after:
                            break  # the client goes away mid-stream
                if drop_after is not None and not ended:
                    tally.add(cancelled=True)
                elif not ended:
                    tally.add(error="the stream ended without [DONE]")
                else:
                    tally.add(tokens=tokens)
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                tally.add(error=f"{type(e).__name__}: {e}")


def run(eng: Engine, prompts: list[Prompt], a: Namespace) -> Report:
    if a.streams < 1 or a.minutes <= 0 or a.cache_tokens < 1 or a.sample_s <= 0:
        raise BenchError("soak: --streams, --minutes, --cache-tokens and --sample-s must be > 0")
    if eng.drafter is None:
        raise BenchError(f"soak: {eng.checkpoint} has no MTP layer (the soak runs adaptive MTP)")
    served = _Served(eng, SpecConfig(depth=3), a.max_batch or a.streams, cache_tokens=a.cache_tokens)
    scheduler = served.server.scheduler
    texts = [p.prompt for p in prompts]
    tally, samples = _Tally(), []
    start = time.monotonic()
    until = start + 60 * a.minutes

    def sample() -> None:
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": round(_rss_mb(), 1),
                        "running": scheduler.running, "waiting": len(scheduler.waiting),
                        "blocks_used": scheduler.cache.used_blocks, "done": tally.done,
                        "cancelled": tally.cancelled, "errors": len(tally.errors),
                        "preemptions": scheduler.preemptions})

    try:
        threads = [threading.Thread(target=_client, args=(served.url, texts, a.max_new_tokens, until, a.seed + i,
                                                          tally), daemon=True) for i in range(a.streams)]
        sample()
        for t in threads:
            t.start()
        while time.monotonic() < until:
            time.sleep(max(0.0, min(a.sample_s, until - time.monotonic())))
            sample()
        for t in threads:  # each ends after its request in flight
            t.join()
        idle_deadline = time.monotonic() + 60  # cancelled rows are retired at the next step
        while (scheduler.running or scheduler.waiting or scheduler.cache.used_blocks) and \
                time.monotonic() < idle_deadline:
            time.sleep(0.1)
        sample()
    finally:
        served.stop()
    end = samples[-1]
    settled = min(samples, key=lambda s: abs(s["t_s"] - 15 * a.minutes))  # the sample nearest a quarter in
    growth = (end["rss_mb"] - settled["rss_mb"]) / settled["rss_mb"]
    failures = []
    if tally.errors:
        failures.append(f"soak: {len(tally.errors)} requests failed, e.g. {tally.errors[0]}")
    if end["running"] or end["waiting"] or end["blocks_used"]:
        failures.append(f"soak: after the clients stopped {end['running']} requests ran, {end['waiting']} waited "
                        f"and {end['blocks_used']} cache blocks were held")
    if growth > a.rss_slack:
        failures.append(f"soak: resident memory grew {100 * growth:.1f}% after the first quarter "
                        f"({settled['rss_mb']:.0f} -> {end['rss_mb']:.0f} MiB; allowed {100 * a.rss_slack:.0f}%)")
    wall = end["t_s"]
    summary = {"streams": a.streams, "minutes": a.minutes, "requests_done": tally.done,
               "requests_cancelled": tally.cancelled, "errors": len(tally.errors), "tokens": tally.tokens,
               "tokens_per_s": tally.tokens / wall if wall else None, "preemptions": scheduler.preemptions,
               "rss_settled_mb": settled["rss_mb"], "rss_end_mb": end["rss_mb"], "rss_growth": growth,
               "blocks_used_end": end["blocks_used"], "first_errors": tally.errors[:5]}
    every = max(1, len(samples) // 20)  # the table shows about 20 samples (all are in the JSON)
    shown = samples[::every] + ([end] if samples[::every][-1] is not end else [])
    keys = ["t_s", "rss_mb", "running", "waiting", "blocks_used", "done", "cancelled", "errors", "preemptions"]
    tables = [Table("Soak: summary", ["streams", "minutes", "requests", "cancelled", "errors", "tokens/s",
                                      "preemptions", "RSS settled MiB", "RSS end MiB", "RSS growth",
                                      "blocks held after"],
                    [[str(a.streams), fmt(float(a.minutes), 1), str(tally.done), str(tally.cancelled),
                      str(len(tally.errors)), fmt(summary["tokens_per_s"], 1), str(scheduler.preemptions),
                      fmt(settled["rss_mb"], 0), fmt(end["rss_mb"], 0), f"{100 * growth:+.1f}%",
                      str(end["blocks_used"])]]),
              Table("Soak: samples", keys, [[fmt(s[k]) for k in keys] for s in shown])]
    settings = {"checkpoint": str(eng.checkpoint), "streams": a.streams, "minutes": a.minutes,
                "max_batch": a.max_batch or a.streams,
                "cache_tokens": a.cache_tokens, "block_size": scheduler.cache.block_size,
                "max_new_tokens": a.max_new_tokens, "prompts": len(prompts), "sample_s": a.sample_s,
                "rss_slack": a.rss_slack}
    notes = ["adaptive MTP depth 3; requests: greedy or sampled at T 0.8 (seeded), budgets 8..max-new-tokens, a "
             "quarter with stop string \"\\n\\n\", one in eight dropped by its client after 1-3 chunks",
             "RSS: this process (server, engine and clients); settled = the sample nearest a quarter of the run"]
    report = Report("soak", "Serving soak", settings, [summary] + samples, tables, notes, failures)
    report.plots = [("over_time", lambda: plots.soak_over_time(samples))]
    return report
