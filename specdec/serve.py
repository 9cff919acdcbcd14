"""`python -m specdec.serve` (`specdec-serve`): an OpenAI-compatible HTTP server over the decoding loop.

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics
(Prometheus text). Requests are decoded together with continuous batching (`specdec.scheduler`):
MTP speculation (adaptive by default) when the checkpoint has an MTP layer. A step that accepts
several tokens sends them in one chunk. Errors use OpenAI's error body: 400 for a bad request
(malformed JSON, unknown model, bad or unsupported parameter, prompt + max_tokens beyond the
context), 429 with Retry-After when the queue is full, 503 while shutting down. A client that
disconnects mid-stream cancels its request. SIGTERM: stop accepting, finish what runs, exit.

Built on FastAPI + uvicorn and prometheus_client. Under torchrun, rank 0 serves HTTP and schedules;
the other ranks follow its rounds in lockstep (`Scheduler.follow`) and exit when it has drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from specdec.model.errors import ConfigError, SpecdecError
from specdec.distributed import exit_rank, shutdown, under_torchrun
from specdec.engine import Engine, SpecConfig
from specdec.generate import CliParser, add_backend_flags
from specdec.openai_protocol import (DEFAULT_CHAT_TEMPLATE, CompletionParams, RequestError, chunk_body,
                                     completion_body, new_id, parse_chat, parse_completion, usage)
from specdec.scheduler import NotAccepting, QueueFull, Scheduler
from specdec.sequence import FINISH_REASONS, Sequence
from specdec.server_metrics import ServerMetrics
from specdec.text_stream import TextStream

FAILED = "error"  # queue item: the decoding loop stopped on an error


@dataclass
class ServerConfig:
    """model_name: what /v1/models lists and requests must name. max_batch: sequences decoded at
    once (cache rows). max_waiting: queue limit. prefill_tokens: prompt tokens admitted per step.
    cache_tokens: slots of the paged latent-cache pool (None: max_batch × the context); block_size:
    slots per block."""

    model_name: str = "specdec-default"
    max_batch: int = 32
    max_waiting: int = 256
    prefill_tokens: int = 512
    static: bool = False  # static batching (a baseline for benchmarks): see `Scheduler`
    cache_tokens: int | None = None
    block_size: int = 16


class Server:
    """The engine, its scheduler (on a thread of its own), metrics, and the request handling."""

    def __init__(self, engine, spec, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.metrics = ServerMetrics(config.model_name, spec.depth if spec is not None else 0)
        self.scheduler = Scheduler(engine, spec, config.max_batch, config.max_waiting, config.prefill_tokens,
                                   on_step=lambda sched, kept: self.metrics.on_step(sched), static=config.static,
                                   cache_tokens=config.cache_tokens, block_size=config.block_size)
        self.listeners: dict[Sequence, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ the loop thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="specdec-decoding-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self.scheduler.run()
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear of it, not hang
            self.failure = e
            self.scheduler.drain()
            print(f"specdec.serve: the decoding loop stopped: {type(e).__name__}: {e}", file=sys.stderr)
            for seq, (loop, queue) in list(self.listeners.items()):
                seq.finish("cancelled")
                loop.call_soon_threadsafe(queue.put_nowait, ([], FAILED))

    def stop(self) -> None:
        """Stop admitting; return once everything queued and running has finished."""
        self.scheduler.drain()
        if self.thread is not None:
            self.thread.join()

    # ------------------------------------------------------------------ requests

    def prompt_ids(self, params: CompletionParams) -> list[int]:
        tok = self.engine.tokenizer
        try:
            if params.messages is not None:
                template = None if getattr(tok, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
                text = tok.apply_chat_template(params.messages, tokenize=False, add_generation_prompt=True,
                                               chat_template=template)
                return self.engine.encode([text])[0]
            return self.engine.encode([params.prompt if params.prompt is not None else params.prompt_ids])[0]
        except ConfigError as e:
            where = "messages" if params.messages is not None else "prompt"
            raise RequestError(f"'{where}': {str(e).replace('prompt 0 ', '')}", where) from None

    def sequence(self, params: CompletionParams, ids: list[int]) -> Sequence:
        where = "messages" if params.messages is not None else "prompt"
        room = self.scheduler.max_new_tokens_for(len(ids))
        context = self.scheduler.context_limit
        if room < 1:
            raise RequestError(f"'{where}' has {len(ids)} tokens; the context holds {context} "
                               f"(with {self.scheduler.draft_slots} draft slots)", where)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise RequestError(f"'max_tokens' is {max_tokens}, but the prompt has {len(ids)} tokens and the context "
                               f"holds {context}: at most {room} new tokens", "max_tokens")
        return Sequence(ids, max_tokens, params.temperature, params.top_p, params.seed, 0)

    def submit(self, seq: Sequence) -> asyncio.Queue:
        """Queue `seq`; its tokens arrive on the returned queue as (tokens, finish_reason or None)."""
        if self.failure is not None:
            raise RequestError("the decoding loop has stopped on an error", status=503, type_="server_error")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_tokens(s: Sequence, tokens: list[int]) -> None:  # the loop thread
            self.metrics.on_tokens(s, len(tokens))
            loop.call_soon_threadsafe(queue.put_nowait, (tokens, s.finish_reason))

        seq.on_tokens = on_tokens
        self.listeners[seq] = (loop, queue)
        try:
            self.scheduler.submit(seq)
        except QueueFull as e:
            del self.listeners[seq]
            raise RequestError(f"too many requests: {e}; retry later", status=429, type_="rate_limit_error",
                               headers={"Retry-After": "1"}) from None
        except NotAccepting as e:
            del self.listeners[seq]
            raise RequestError(f"{e}; retry on another replica", status=503, type_="server_error",
                               headers={"Retry-After": "5"}) from None
        except ConfigError as e:
            del self.listeners[seq]
            raise RequestError(str(e), "max_tokens") from None
        return queue

    def done(self, seq: Sequence, finish: str | None) -> None:
        """The request's handler is finished with `seq`: `finish` is how it ended (None: the client
        went away; `FAILED`: the decoding loop stopped)."""
        reason = finish if finish in FINISH_REASONS else "cancelled"  # gone away, or the loop failed
        self.scheduler.finish(seq, reason)  # no-op when it already ended
        self.listeners.pop(seq, None)
        self.metrics.on_finish(seq, reason)

    async def complete(self, params: CompletionParams, chat: bool):
        ids = self.prompt_ids(params)
        seq = self.sequence(params, ids)
        queue = self.submit(seq)
        rid, model = new_id("chatcmpl" if chat else "cmpl"), self.config.model_name
        text = TextStream(self.engine.decode, params.stop)
        if params.stream:
            return self._stream(seq, queue, text, rid, model, chat, params.include_usage)
        finish = None
        try:
            parts = []
            while finish is None:
                tokens, finish = await queue.get()
                if finish == FAILED:
                    raise RequestError("the decoding loop stopped on an error", status=500, type_="server_error")
                parts.append(text.push(tokens))
                if text.stopped:
                    self.scheduler.finish(seq, "stop")
                    finish = "stop"
            parts.append(text.flush())
            return completion_body(rid, model, "".join(parts), finish, usage(len(ids), len(seq.output)), chat)
        finally:
            self.done(seq, finish)

    async def _stream(self, seq: Sequence, queue: asyncio.Queue, text: TextStream, rid: str, model: str,
                      chat: bool, include_usage: bool):
        def event(body: dict) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        finish = None
        try:
            if chat:
                yield event(chunk_body(rid, model, None, None, chat, first=True))
            while finish is None:
                tokens, finish = await queue.get()
                if finish == FAILED:
                    error = RequestError("the decoding loop stopped on an error", status=500, type_="server_error")
                    yield event(error.body())
                    return
                piece = text.push(tokens)
                if text.stopped:
                    self.scheduler.finish(seq, "stop")
                    finish = "stop"
                elif finish is not None:
                    piece += text.flush()
                if piece:
                    yield event(chunk_body(rid, model, piece, None, chat))
            use = usage(len(seq.prompt), len(seq.output))
            yield event(chunk_body(rid, model, None, finish, chat, use=use))
            if include_usage:
                body = chunk_body(rid, model, None, None, chat, use=use)
                body["choices"] = []
                yield event(body)
            yield "data: [DONE]\n\n"
        finally:
            self.done(seq, finish)


def build_app(server: Server):
    """The FastAPI application of `server` (starts and stops its decoding loop with the app)."""
    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="specdec", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def handle(request: Request, parse, chat: bool):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON body: {e}") from None
        result = await server.complete(parse(body, server.config.model_name), chat)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, parse_chat, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "specdec",
                                            "max_model_len": server.engine.max_seq_len}]}

    @app.get("/health")
    async def health():
        if server.failure is not None or not server.scheduler.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        server.metrics.on_step(server.scheduler)  # gauges as of now, not of the last step
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="specdec.serve", description="Serve a DeepSeek-V3 checkpoint over the OpenAI API (specdec).")
    p.add_argument("--ckpt-path", help="checkpoint directory (HF layout); default: the embedded model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: specdec-default, or the checkpoint folder's name)")
    p.add_argument("--spec", choices=["mtp", "none"], default=None,
                   help="mtp: MTP speculative decoding (default when the checkpoint has an MTP layer); none: plain")
    p.add_argument("--draft-depth", type=int, default=3, help="most tokens a step drafts (K)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="choose each step's draft depth in 0..K from measured step costs and acceptance (default; "
                        "with --compile: 0 or K)")
    p.add_argument("--draft-vocab", type=int, default=None, help="draft only among the N lowest token ids")
    p.add_argument("--tree-topk", type=int, default=1,
                   help="children per expanded draft node (1: a chain; a tree pins its shape every step)")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="draft nodes verified per step (default: tree-topk x draft-depth)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context: prompt + generation (default 2048)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded at once (default 32)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default 256)")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step at most; longer prompts go in chunks (default 512)")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="slots in the paged latent-cache pool (default: max-batch × max-seq-len); when it runs "
                        "out, the newest requests are preempted and recomputed later")
    p.add_argument("--block-size", type=int, default=16, help="slots per cache block (default 16)")
    add_backend_flags(p, "each batch bucket and sampling mix compiles on first use, ~30-120 s, while the "
                         "requests of that step wait")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    return p


def load_server(a: argparse.Namespace) -> Server:
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if not 0 < a.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {a.port}")
    if a.draft_depth < 1:
        raise ConfigError(f"--draft-depth must be >= 1, got {a.draft_depth}")
    if a.tree_topk < 1:
        raise ConfigError(f"--tree-topk must be >= 1, got {a.tree_topk}")
    engine = Engine.from_pretrained(a.ckpt_path, device=a.device, max_seq_len=a.max_seq_len,
                                    kv_cache_dtype=a.kv_cache_dtype, compile=a.compile, cuda_graphs=a.cuda_graphs,
                                    batch_invariant=a.batch_invariant)
    spec = None
    if (a.spec or ("mtp" if engine.drafter is not None else "none")) == "mtp":
        if engine.drafter is None:
            raise ConfigError(f"--spec mtp: {engine.checkpoint} has no MTP layer")
        try:
            spec = SpecConfig(depth=a.draft_depth, topk=a.tree_topk, nodes=a.tree_nodes, draft_vocab=a.draft_vocab,
                              adaptive=a.adaptive)
        except ConfigError as e:
            raise ConfigError(f"--draft-depth/--tree-topk/--tree-nodes/--draft-vocab: {e}") from None
        engine.check_spec(spec)
    name = a.served_model_name or ("specdec-default" if a.ckpt_path is None else engine.checkpoint.resolve().name)
    return Server(engine, spec, ServerConfig(name, a.max_batch, a.max_waiting, a.prefill_tokens,
                                             cache_tokens=a.cache_tokens, block_size=a.block_size))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        server = load_server(a)
    except SpecdecError as e:
        print(f"specdec.serve: error: {e}", file=sys.stderr)
        return 2
    if server.scheduler.following:
        return follow(server)
    import uvicorn

    print(f"specdec.serve: serving '{server.config.model_name}' on http://{a.host}:{a.port}/v1 "
          f"({'MTP depth ' + str(server.scheduler.spec.depth) if server.scheduler.spec else 'plain decoding'}"
          f"{', compiled steps' if server.engine.compiled is not None else ''}, "
          f"{server.config.max_batch} rows, {server.scheduler.cache.n_blocks} cache blocks of "
          f"{server.scheduler.cache.block_size})", file=sys.stderr, flush=True)
    uvicorn.run(build_app(server), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None)
    shutdown()  # the followers were released when the loop drained
    return 0


def follow(server: Server) -> int:
    """A torchrun rank > 0: replay rank 0's rounds until its server drains. SIGTERM and SIGINT are
    left to rank 0 (torchrun sends them to every rank): it finishes the running requests and then
    releases this rank."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with torch.inference_mode():
        server.scheduler.follow()
    shutdown()
    return 0


if __name__ == "__main__":
    status = main()
    if under_torchrun():  # ranks leave without the interpreter's teardown (`exit_rank`)
        exit_rank(status)
    sys.exit(status)
