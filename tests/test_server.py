"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, on 127.0.0.1:
greedy responses equal `Engine.generate`'s plain output, streams, stop strings, errors in OpenAI's
format, cancellation that frees the cache rows, metrics, and SIGTERM draining."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from specdec import SpecConfig
from specdec.scheduler import QueueFull
from specdec.serve import Server, ServerConfig, build_app
from specdec.text_stream import TextStream

MODEL = "test-model"
PROMPTS = ["def main(args):", "import os\nimport sys\n", "class Point:\n    def", "for i in range(10):",
           "return self.", "# parse the file", "x = [", "while True:\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A `Server` over `engine` behind uvicorn on a thread (127.0.0.1, a free port)."""

    def __init__(self, engine, spec, **config) -> None:
        self.server = Server(engine, spec, ServerConfig(MODEL, **config))
        self.port = free_port()
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module", params=["mtp", "plain"])
def served(f32_engine, request):
    spec = SpecConfig(depth=3) if request.param == "mtp" else None
    running = RunningServer(f32_engine, spec, max_batch=8, max_waiting=64)
    yield running
    running.stop()


def plain_text(engine, ids: list[int], n: int) -> str:
    return engine.generate([ids], max_new_tokens=n).texts[0]


def test_completions_equal_plain_greedy(served, f32_engine):
    for prompt in PROMPTS[:3]:
        r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        want = plain_text(f32_engine, f32_engine.encode([prompt])[0], 20)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(f32_engine.encode([prompt])[0])
        assert r.choices[0].finish_reason == "length"


def test_streaming_completions_and_chat_equal_plain_greedy(served, f32_engine):
    prompt = PROMPTS[3]
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain_text(f32_engine, f32_engine.encode([prompt])[0], 24)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort a list"}]
    chat = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    ids = served.server.prompt_ids(_chat_params(messages))
    want = plain_text(f32_engine, ids, 16)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    stream = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    use = parts[-1].usage  # the random-weight model may end with EOS before 16 tokens
    assert use.prompt_tokens == len(ids) and 1 <= use.completion_tokens <= 16
    assert use.total_tokens == len(ids) + use.completion_tokens


def _chat_params(messages):
    from specdec.openai_protocol import parse_chat
    return parse_chat({"model": MODEL, "messages": messages}, MODEL)


def test_many_requests_in_flight_each_equal_plain_greedy(served, f32_engine):
    """32 requests at once (8 rows: joins and leaves while others run), each its plain greedy text."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 17) for i in range(32)]

    def ask(job):
        prompt, n = job
        return served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, jobs))
    for (prompt, n), r in zip(jobs, results):
        assert r.choices[0].text == plain_text(f32_engine, f32_engine.encode([prompt])[0], n)
    wait_idle(served)


def test_a_tree_drafting_server_answers_plain_greedy(f32_engine, f32_ckpt):
    """`--tree-topk 2`: the server drafts trees over its paged cache; 12 requests in flight (4 rows),
    each its plain greedy text; a bad tree flag is a one-line error."""
    from specdec.model.errors import ConfigError
    from specdec.serve import build_parser, load_server
    server = load_server(build_parser().parse_args(["--ckpt-path", str(f32_ckpt), "--draft-depth", "2",
                                                    "--tree-topk", "2", "--tree-nodes", "4", "--max-seq-len", "160"]))
    assert server.scheduler.spec.topk == 2 and server.scheduler.spec.n_nodes == 4
    with pytest.raises(ConfigError, match="--tree-topk must be >= 1, got 0"):
        load_server(build_parser().parse_args(["--ckpt-path", str(f32_ckpt), "--tree-topk", "0"]))
    running = RunningServer(f32_engine, SpecConfig(depth=2, topk=2, nodes=4), max_batch=4, max_waiting=64)
    try:
        jobs = [(PROMPTS[i % len(PROMPTS)], 3 + (i * 5) % 13) for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda job: running.client.completions.create(
                model=MODEL, prompt=job[0], max_tokens=job[1], temperature=0), jobs))
        for (prompt, n), r in zip(jobs, results):
            assert r.choices[0].text == plain_text(f32_engine, f32_engine.encode([prompt])[0], n)
        wait_idle(running)
    finally:
        running.stop()


def test_stop_strings_end_the_text_before_them(served, f32_engine):
    prompt = PROMPTS[0]
    full = plain_text(f32_engine, f32_engine.encode([prompt])[0], 30)
    stop = full[5:8]  # a stop string that spans what may be several tokens
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampled_requests_follow_their_seed(served, f32_engine):
    prompt = PROMPTS[4]
    ids = f32_engine.encode([prompt])[0]
    want = f32_engine.generate([ids], max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5).texts[0]
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9,
                                         seed=5)
    assert r.choices[0].text == want


@pytest.mark.parametrize("body, param", [
    ({"model": "other", "prompt": "a"}, "model"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 10_000}, "max_tokens"),
    ({"model": MODEL, "prompt": "a " * 400}, "prompt"),
    ({"model": MODEL, "prompt": "a", "n": 3}, "n"),
    ({"model": MODEL, "prompt": "a", "logprobs": 2}, "logprobs"),
    ({"model": MODEL, "prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": "a", "stop": ["", "x"]}, "stop"),
])
def test_bad_requests_are_400_in_openai_format(served, body, param):
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_and_bad_chat(served):
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot",
                                                                                           "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="nope", prompt="x")


def test_queue_full_is_429_with_retry_after(served, monkeypatch):
    def full(seq):
        raise QueueFull("256 requests are waiting (the limit)")

    monkeypatch.setattr(served.server.scheduler, "submit", full)
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list()] == [MODEL]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    served.client.completions.create(model=MODEL, prompt="x = 1", max_tokens=8, temperature=0)
    text = httpx.get(served.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:generation_tokens_total", "vllm:request_success_total"):
        assert name in text, name
    if served.server.scheduler.spec is not None:
        for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                     "vllm:spec_decode_num_accepted_tokens_total",
                     'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="test-model",position="0"}'):
            assert name in text, name


def wait_idle(served, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    sched = served.server.scheduler
    while sched.running or sched.waiting:
        assert time.monotonic() < deadline, (sched.running, len(sched.waiting))
        time.sleep(0.05)


def test_cancelled_streams_free_every_row(served):
    """100 streams closed after their first chunk: their requests end and no cache row stays held."""
    def open_and_drop(i):
        with httpx.stream("POST", served.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 120,
                                "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return True  # leaving the block closes the connection mid-stream
        return False

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        assert all(pool.map(open_and_drop, range(100)))
    wait_idle(served)
    assert served.server.scheduler.cache.used_blocks == 0 and not served.server.listeners
    text = httpx.get(served.url + "/metrics").text
    assert 'specdec:cache_blocks_used{model_name="test-model"} 0.0' in text


def test_a_failed_decoding_loop_answers_500_in_openai_format(f32_engine):
    """When the decoding loop raises, the waiting request gets a 500 with an OpenAI error body (and the
    request is counted as cancelled), not a bare server error."""
    running = RunningServer(f32_engine, None, max_batch=2)
    try:
        def broken_step():
            raise RuntimeError("injected failure")

        running.server.scheduler.decoder.step = broken_step
        r = httpx.post(running.url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "stopped on an error" in r.json()["error"]["message"]
        text = httpx.get(running.url + "/metrics").text
        assert 'vllm:request_success_total{finished_reason="cancelled",model_name="test-model"} 1.0' in text
    finally:
        running.stop()


def test_text_stream_holds_back_partial_stop_strings():
    vocab = {1: "ab", 2: "c", 3: "STO", 4: "P", 5: "d"}
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), ["STOP"])
    assert stream.push([1]) == "ab"
    assert stream.push([2, 3]) == "c"  # "STO" could start the stop string: held back
    assert stream.push([4, 5]) == "" and stream.stopped  # "STOP" arrived: nothing of it is sent
    other = TextStream(lambda ids: "".join(vocab[i] for i in ids), ["STOP"])
    other.push([3])
    assert other.push([5]) == "STOd" and other.flush() == ""


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_finishes_running_streams_then_exits(tmp_path, f32_ckpt, f32_engine, ranks):
    """The server as a process (under torchrun with 2 ranks: rank 0 serves, rank 1 follows in lockstep):
    requests in flight at once and a dropped stream; then SIGTERM mid-stream lets that stream finish
    and every process exit."""
    port = free_port()
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if ranks == 2 else []
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "specdec.serve", "--ckpt-path", str(f32_ckpt),
                             "--port", str(port), "--max-seq-len", "160", "--served-model-name", MODEL],
                            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        with httpx.stream("POST", url + "/v1/completions", timeout=120,  # dropped after its first chunk
                          json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 100, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=24,
                                                                      temperature=0).choices[0].text, PROMPTS[:4]))
        assert texts == [plain_text(f32_engine, f32_engine.encode([p])[0], 24) for p in PROMPTS[:4]]
        events = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if not events:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                events.append(line[6:])
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        want = f32_engine.generate([f32_engine.encode([PROMPTS[0]])[0]], max_new_tokens=100).token_ids[0]
        assert last["usage"]["completion_tokens"] == len(want) > 10  # ran to its own end after the signal
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        code = proc.wait(timeout=90)
        if ranks == 1:
            assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
        logged = (tmp_path / "server.log").read_text()
        assert not re.search(r'File ".*/(specdec|model)/', logged), logged  # torchrun reports the signal itself
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
