"""The server's Prometheus metrics, named as vLLM names them (so its dashboards work unchanged).

Gauges: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
(share of the paged cache pool's blocks held), `specdec:cache_blocks_used`, `specdec:num_preemptions`. Counters: `vllm:prompt_tokens`,
`vllm:generation_tokens`, `vllm:request_success` (label finished_reason), the spec-decode
counters `vllm:spec_decode_num_drafts` (row-steps that drafted), `vllm:spec_decode_num_draft_tokens`,
`vllm:spec_decode_num_accepted_tokens`, `vllm:spec_decode_num_accepted_tokens_per_pos` (label
position, 0-based), and `specdec:steps` (label depth: steps run at each draft depth, 0 = plain).
Histograms: `vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds` (each token:
the wait since the previous tokens of its request over how many arrived together),
`vllm:e2e_request_latency_seconds`. Every metric has the label model_name.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specdec.sequence import Sequence

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class ServerMetrics:
    """One registry per server. Call `on_step` after each decoding step (the loop thread),
    `on_tokens` when a request receives tokens and `on_finish` when it ends."""

    def __init__(self, model_name: str, max_depth: int) -> None:
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry
        self.running = Gauge("vllm:num_requests_running", "Requests in the decoding batch", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued for admission", labels, registry=r)
        self.cache_usage = Gauge("vllm:kv_cache_usage_perc", "Share of the latent-cache pool's blocks in use (0..1)",
                                 labels, registry=r)
        self.blocks_used = Gauge("specdec:cache_blocks_used", "Latent-cache pool blocks held by requests", labels,
                                 registry=r)
        self.preemptions = Gauge("specdec:num_preemptions", "Requests preempted (their cache recomputed later) so far",
                                 labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"], registry=r)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Row-steps that drafted tokens", labels, registry=r)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens", labels, registry=r)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Accepted drafted tokens", labels,
                                registry=r)
        self.accepted_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                    "Accepted drafted tokens by draft position", labels + ["position"], registry=r)
        self.steps = Counter("specdec:steps", "Decoding steps by draft depth (0: plain)", labels + ["depth"],
                             registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token", labels,
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency", labels, buckets=E2E_BUCKETS,
                             registry=r)
        self.model = model_name
        for pos in range(max_depth):  # every position shows from the start, at 0
            self.accepted_pos.labels(model_name, str(pos))
        self._last_token: dict[int, float] = {}
        self._seen = None  # the decoder's cumulative counts at the previous step

    def on_step(self, scheduler) -> None:
        m = self.model
        dec = scheduler.decoder
        self.running.labels(m).set(scheduler.running)
        self.waiting.labels(m).set(len(scheduler.waiting))
        self.cache_usage.labels(m).set(scheduler.cache_usage())
        self.blocks_used.labels(m).set(scheduler.cache.used_blocks)
        self.preemptions.labels(m).set(scheduler.preemptions)
        c = dec.counts
        now = (c.drafted_at[0] if c.drafted_at else 0, c.drafted, c.accepted, list(c.per_position),
               list(c.depth_steps))
        before = self._seen or (0, 0, 0, [], [])
        self._seen = now
        self.drafts.labels(m).inc(now[0] - before[0])
        self.draft_tokens.labels(m).inc(now[1] - before[1])
        self.accepted.labels(m).inc(now[2] - before[2])
        for pos, count in enumerate(now[3]):
            delta = count - (before[3][pos] if pos < len(before[3]) else 0)
            if delta:
                self.accepted_pos.labels(m, str(pos)).inc(delta)
        for depth, count in enumerate(now[4]):
            delta = count - (before[4][depth] if depth < len(before[4]) else 0)
            if delta:
                self.steps.labels(m, str(depth)).inc(delta)

    def on_tokens(self, seq: Sequence, n: int) -> None:
        now = time.perf_counter()
        m = self.model
        self.generation_tokens.labels(m).inc(n)
        last = self._last_token.get(id(seq))
        if last is None:
            self.ttft.labels(m).observe(now - seq.arrival_s)
            self.prompt_tokens.labels(m).inc(len(seq.prompt))
            n -= 1  # the first token's wait is its TTFT
            last = now
        for _ in range(n):
            self.tpot.labels(m).observe((now - last) / max(n, 1))
        self._last_token[id(seq)] = now

    def on_finish(self, seq: Sequence, reason: str) -> None:
        """`seq`'s request ended for `reason` (one of `FINISH_REASONS`)."""
        self._last_token.pop(id(seq), None)
        self.success.labels(self.model, reason).inc()
        self.e2e.labels(self.model).observe(time.perf_counter() - seq.arrival_s)
