"""`python -m specdec.bench serve`: the OpenAI server under load, adaptive MTP against plain decoding.

For each configuration (plain, then adaptive MTP up to depth 3; with `--compile` every step
compiled, adaptive steps plain or of depth 3, after an untimed warm-up round) the bench starts `specdec.serve`'s
app on 127.0.0.1 (a free port, in this process, over the one loaded engine) and sends streamed
greedy completions of the prompts (cycled): closed-loop with C concurrent clients (each sends its
next request when the last one ends), and open-loop with Poisson arrivals at R requests/s. Per
request: TTFT (send → first content chunk), TPOT ((last chunk − first chunk) / (tokens − 1)).
Reported: output tokens/s (all new tokens / wall seconds of the run), TTFT and TPOT p50/p99,
tau and tokens kept per request-step (the decoder's counts over the run), and, at each closed-loop
concurrency, static batching (the same server, admitting only into an empty batch of at most C
requests, adaptive MTP) for the same requests: what continuous batching gains over a batch that
waits for its slowest row, with the same HTTP path. `--repeats` rounds each serve every
configuration in turn (the order rotating), and a table figure is the median over rounds, so the
drift of a shared machine lands on every configuration alike.
"""

from __future__ import annotations

import json
import random
import statistics
import socket
import threading
import time
from argparse import Namespace

import httpx
import uvicorn

from specdec.bench import plots
from specdec.bench.common import (BenchError, Report, Table, fmt, paired_ratio, parse_float_list, parse_int_list,
                                  progress)
from specdec.bench.prompt_set import Prompt
from specdec import Engine, SpecConfig
from specdec.serve import Server, ServerConfig, build_app

MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Served:
    """The app over `eng` behind uvicorn on a thread, on 127.0.0.1; `stop` shuts it down."""

    def __init__(self, eng: Engine, spec: SpecConfig | None, max_batch: int, static: bool = False,
                 cache_tokens: int | None = None) -> None:
        self.server = Server(eng, spec, ServerConfig(MODEL, max_batch=max_batch, max_waiting=4096, static=static,
                                                     cache_tokens=cache_tokens))
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(self.server), host="127.0.0.1", port=_free_port(),
                                                     log_level="error"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if time.monotonic() > deadline:
                raise BenchError("bench serve: the server did not start within 60 s")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.uvicorn.config.port}/v1/completions"

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=120)


def _request(client: httpx.Client, url: str, prompt: str | list[int], max_tokens: int,
             arrivals: list[float] | None = None) -> dict:
    """One streamed greedy completion; its timings and token count (`arrivals`: each chunk's time)."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise BenchError(f"bench serve: the server answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = now
            if arrivals is not None and not chunk.get("usage"):
                arrivals.append(now)
            last = now
    first = first or last
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens}


def _closed_loop(url: str, jobs: list[tuple[str, int]], clients: int) -> tuple[list[dict], float]:
    lock, results, queue = threading.Lock(), [], list(jobs)

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt, n = queue.pop(0)
                out = _request(client, url, prompt, n)
                with lock:
                    results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def _poisson(url: str, jobs: list[tuple[str, int]], rate: float, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    results, lock, threads = [], threading.Lock(), []

    def one(prompt, n):
        with httpx.Client(timeout=600) as client:
            out = _request(client, url, prompt, n)
        with lock:
            results.append(out)

    start = time.perf_counter()
    for prompt, n in jobs:
        t = threading.Thread(target=one, args=(prompt, n))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def _long_prefill(url: str, short: list[tuple[str, int]], long_prompt: list[int], clients: int) -> dict:
    """`clients` streams decode while one `len(long_prompt)`-token prompt arrives and is prefilled:
    the streams' gaps between chunks during that prefill (submission to its first token) against
    their gaps outside it."""
    arrivals: list[list[float]] = [[] for _ in range(clients)]
    window: list[float] = []

    def stream(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            _request(client, url, short[i % len(short)][0], short[i % len(short)][1], arrivals[i])

    def long_request() -> None:
        with httpx.Client(timeout=600) as client:
            window.append(time.perf_counter())
            out = _request(client, url, long_prompt, 1)
            window.append(window[0] + out["ttft"])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while not all(len(a) >= 3 for a in arrivals):  # every stream is decoding
        time.sleep(0.01)
    longer = threading.Thread(target=long_request)
    longer.start()
    for t in threads + [longer]:
        t.join()
    start, end = window
    during, outside = [], []
    for a in arrivals:
        for t0, t1 in zip(a[1:], a[2:]):
            (during if t0 >= start and t1 <= end else outside).append(t1 - t0)
    return {"long_prompt_tokens": len(long_prompt), "long_ttft_ms": 1e3 * (end - start),
            "gaps_during": len(during), "gap_during_p50_ms": 1e3 * (_pct(during, 0.5) or 0),
            "gap_during_p99_ms": 1e3 * (_pct(during, 0.99) or 0),
            "gap_outside_p50_ms": 1e3 * (_pct(outside, 0.5) or 0),
            "gap_outside_p99_ms": 1e3 * (_pct(outside, 0.99) or 0)}


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _summary(label: str, mode: str, results: list[dict], wall: float, counts_before, counts_after) -> dict:
    tokens = sum(r["tokens"] for r in results)
    row_steps = counts_after[0] - counts_before[0]
    emitted = counts_after[1] - counts_before[1]
    return {"config": label, "mode": mode, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in results], 0.5),
            "ttft_p99_ms": 1e3 * _pct([r["ttft"] for r in results], 0.99),
            "tpot_p50_ms": 1e3 * (_pct([r["tpot"] for r in results], 0.5) or 0),
            "tpot_p99_ms": 1e3 * (_pct([r["tpot"] for r in results], 0.99) or 0),
            "tau": emitted / row_steps if row_steps else None,
            "kept_per_row_step": (tokens - len(results)) / row_steps if row_steps else None}


def _serve_loads(served: _Served, label: str, static: bool, jobs: list[tuple[str, int]], clients: list[int],
                 rates: list[float], seed: int, bar) -> list[dict]:
    """One configuration's loads against its server: each closed-loop client count, then (unless static)
    each Poisson rate; one summary per load (`_summary`)."""
    counts = served.server.scheduler.decoder.counts
    snap = lambda: (counts.row_steps, counts.emitted)  # noqa: E731
    _closed_loop(served.url, jobs[: min(4, len(jobs))], min(4, len(jobs)))  # warm-up
    out = []
    for c in clients:
        if static:  # a batch of at most c requests at a time
            served.server.scheduler.max_rows = c
        before = snap()
        results, wall = _closed_loop(served.url, jobs, c)
        out.append(_summary(label, f"closed {c} clients", results, wall, before, snap()))
        bar.update(1)
    for rate in ([] if static else rates):
        before = snap()
        results, wall = _poisson(served.url, jobs, rate, seed)
        out.append(_summary(label, f"Poisson {rate:g}/s", results, wall, before, snap()))
        bar.update(1)
    return out


def _median_row(runs: list[dict]) -> dict:
    """One table row from a load's rounds: each figure the median over rounds, `rounds` how many."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if key not in ("config", "mode", "round") and isinstance(value, (int, float)):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
    row["rounds"] = len(runs)
    del row["round"]
    return row


def run(eng: Engine, prompts: list[Prompt], a: Namespace) -> Report:
    clients = parse_int_list(a.clients, "--clients")
    rates = parse_float_list(a.rates, "--rates") if a.rates else []
    if not clients and not rates:
        raise BenchError("serve: give --clients and/or --rates")
    if any(r <= 0 for r in rates):
        raise BenchError(f"--rates must be > 0, got {a.rates}")
    n_requests = a.requests or 2 * len(prompts)
    jobs = [(prompts[i % len(prompts)].prompt, a.max_new_tokens) for i in range(n_requests)]
    configs = [("plain", None, False), ("adaptive 3", SpecConfig(depth=3), False),
               ("adaptive 3, static batching", SpecConfig(depth=3), True)]
    warm_up = eng.compiled is not None  # an untimed first round compiles the steps its loads run
    stalls: list[dict] = []
    long_prompt = []
    if a.long_prompt:
        if a.long_prompt < 2 or a.long_prompt + 1 > eng.max_seq_len - 8:
            raise BenchError(f"--long-prompt must be in 2..{eng.max_seq_len - 9} tokens, got {a.long_prompt}")
        text = "\n".join(p.prompt for p in prompts)
        ids = eng.tokenizer.encode(text, add_special_tokens=False)
        while len(long_prompt) < a.long_prompt:
            long_prompt += ids
        long_prompt = long_prompt[: a.long_prompt]
    per_round = 2 * (len(clients) + len(rates)) + len(clients)
    bar = progress((a.repeats + warm_up) * per_round, "serve")
    rounds: list[list[dict]] = []
    for r in range(a.repeats + warm_up):  # every round serves every configuration, the order rotating
        measured: list[dict] = []
        for label, spec, static in configs[r % len(configs):] + configs[: r % len(configs)]:
            served = _Served(eng, spec, max(clients + [a.max_batch]), static)
            try:
                measured += _serve_loads(served, label, static, jobs, clients, rates, a.seed, bar)
                if long_prompt and not static and r == warm_up:
                    streams = max(1, min(min(clients), served.server.scheduler.max_rows - 1))  # a row left for it
                    stall = _long_prefill(served.url, [(p, 4 * n) for p, n in jobs], long_prompt, streams)
                    stalls.append({"config": label, "clients": streams,
                                   "prefill_tokens": served.server.scheduler.prefill_tokens, **stall})
            finally:
                served.stop()
        for m in measured:
            m["round"] = r - warm_up
        if r >= warm_up:
            rounds.append(measured)
    bar.close()
    order = [(label, m["mode"]) for label, _, _ in configs for m in rounds[0] if m["config"] == label]
    runs = {key: [m for measured in rounds for m in measured if (m["config"], m["mode"]) == key] for key in order}
    rows = [_median_row(runs[key]) for key in order]
    for row in rows:  # against plain decoding under the same load, round by round
        plain = runs.get(("plain", row["mode"]))
        row["vs_plain"] = paired_ratio([m["tokens_per_s"] for m in runs[(row["config"], row["mode"])]],
                                       [m["tokens_per_s"] for m in plain]) if plain else None
    headers = ["config", "load", "requests", "tokens/s", "× plain", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms", "tau", "kept/row-step"]
    table = Table("Serving: streamed greedy completions", headers,
                  [[r["config"], r["mode"], str(r["requests"]), fmt(r["tokens_per_s"], 1), fmt(r["vs_plain"]),
                    fmt(r.get("ttft_p50_ms"), 1), fmt(r.get("ttft_p99_ms"), 1), fmt(r.get("tpot_p50_ms"), 1),
                    fmt(r.get("tpot_p99_ms"), 1), fmt(r.get("tau")), fmt(r.get("kept_per_row_step"))] for r in rows])
    tables = [table]
    if stalls:
        tables.append(Table(f"Streams while a {len(long_prompt)}-token prompt is prefilled",
                            ["config", "streams", "prefill tokens/step", "long prompt TTFT ms", "gaps during",
                             "gap p50 ms during", "gap p99 ms during", "gap p50 ms outside", "gap p99 ms outside"],
                            [[r["config"], str(r["clients"]), str(r["prefill_tokens"]), fmt(r["long_ttft_ms"], 1),
                              str(r["gaps_during"]), fmt(r["gap_during_p50_ms"], 1), fmt(r["gap_during_p99_ms"], 1),
                              fmt(r["gap_outside_p50_ms"], 1), fmt(r["gap_outside_p99_ms"], 1)] for r in stalls]))
    settings = {"checkpoint": str(eng.checkpoint), "prompts": len(prompts), "requests": n_requests,
                "max_new_tokens": a.max_new_tokens,
                "clients": clients, "rates": rates, "max_batch": max(clients + [a.max_batch]),
                "long_prompt": a.long_prompt, "compiled": eng.compiled is not None}
    notes = ["one server per configuration on 127.0.0.1, same engine and requests; tokens/s: new tokens over the "
             "run's wall seconds; × plain: against plain decoding under the same load in the same round",
             f"{a.repeats} round(s), each serving every configuration in turn (the order rotating by round); "
             "every figure is the median over rounds (× plain: of the per-round ratios); the JSON's rounds hold "
             "each round's",
             "tau: tokens emitted per row-step (bonus included, before budget cuts); kept/row-step: tokens the "
             "clients received after each request's first (the prefill's) per row-step: tau less what budget "
             "cuts drop",
             "static batching: the same server admitting only into an empty batch (up to C requests), which "
             "runs until its slowest request ends; the same requests"]
    if warm_up:
        notes.append("--compile: every step runs compiled whole over the paged pool (adaptive: a plain step or "
                     "depth 3); a first, untimed round compiled the steps the loads run")
    if stalls:
        notes.append("long prompt: the streams (the smallest --clients count, at most the server's rows less one; budgets 4x --max-new-tokens) are decoding "
                     "when one prompt of --long-prompt tokens arrives; gap: time between a stream's consecutive "
                     "chunks (one step: one token plain, several with MTP), during = between the long prompt's "
                     "submission and its first token")
    report = Report("serve", "Serving under load", settings, rows + stalls, tables, notes)
    report.extra = {"rounds": rounds}
    report.plots = [("tokens_per_s", lambda: plots.serve_tokens_per_s(rows))]
    return report
