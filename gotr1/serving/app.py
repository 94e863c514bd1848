"""The HTTP server: FastAPI in front of one `LLMEngine` that batches every concurrent request continuously.

Routes: `POST /v1/generate` (JSON, or server-sent events with `"stream": true`), `GET /health`, `GET /metrics`.
Handlers never touch the engine: they validate, hand a `Job` to the engine thread (`worker.py`) and await its
events. A request holds one of `max_queue` in-flight slots from admission to its answer; a client that
disconnects releases its slot and aborts its engine request, which frees its KV blocks before the next step.
Images are VQ-decoded (and PNG-encoded) on a decoder thread, not inside an engine step: a group's decode would
otherwise stall every other request's tokens for its duration (about 0.85 s per 384 px image for the tiny preset
on one CPU thread). Once shutdown begins, every request not answered yet gets a 503 (see `_Server`).
"""
import asyncio
import contextlib
import copy
import dataclasses
import gc
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import MAX_CFG_WEIGHT, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, SamplingParams
from gotr1.model import JanusBundle
from gotr1.serving.metrics import ServerMetrics
from gotr1.serving.responses import IMAGE_PARTS, RETURNABLE, StreamState, encode_images, response_json, sse
from gotr1.serving.worker import SHUTTING_DOWN, EngineWorker, FailedEvent, FinishedEvent, Job, TokensEvent

GENERATE_PATH = "/v1/generate"


@dataclass(slots=True)
class ServerConfig:
    """Admission limits and request defaults. `max_queue` bounds the requests in flight (queued or running); the
    next gets 429. A request body over `max_body_bytes` gets 413 as it arrives, before it is parsed (a valid body
    is a few KiB). The defaults are the model's (`--preset shapes`: CFG 1, 96 reasoning tokens)."""

    max_n: int = 16
    max_queue: int = 64
    max_prompt_chars: int = 2000
    max_body_bytes: int = 2**20
    default_max_reasoning_tokens: int = 600
    default_cfg_weight: float = 5.0
    interrupt_windows: bool = True  # a request arriving mid multi-step window ends the window at its next step

    def __post_init__(self) -> None:
        for name in ("max_n", "max_queue", "max_prompt_chars", "max_body_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.default_max_reasoning_tokens < 0:
            raise ValueError(f"default_max_reasoning_tokens must be >= 0, got {self.default_max_reasoning_tokens}")
        if not 0 <= self.default_cfg_weight <= MAX_CFG_WEIGHT:
            raise ValueError(f"default_cfg_weight must be in [0, {MAX_CFG_WEIGHT}], got {self.default_cfg_weight}")


def request_model(config: ServerConfig, bundle: JanusBundle) -> type[BaseModel]:
    """The `POST /v1/generate` body, with this server's bounds (strict types: `"3"`, `true` or `1.5` is not an
    int; NaN and infinities are refused; unknown fields are refused)."""
    reasoning_limit = bundle.max_positions - 2 - bundle.num_image_tokens  # BOS + BOI + image tokens fit

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

        prompt: str = Field(min_length=1, max_length=config.max_prompt_chars)
        n: int = Field(1, ge=1, le=config.max_n)
        seed: int | None = Field(None, ge=0, lt=2**63)
        cfg_weight: float = Field(config.default_cfg_weight, ge=0, le=MAX_CFG_WEIGHT)
        text_temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
        image_temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
        top_k: int = Field(0, ge=0, le=MAX_TOP_K)
        top_p: float = Field(1.0, gt=0, le=1)
        max_reasoning_tokens: int = Field(min(config.default_max_reasoning_tokens, reasoning_limit), ge=0,
                                          le=reasoning_limit)
        min_reasoning_tokens: int = Field(0, ge=0)
        returns: list[Literal[RETURNABLE]] = Field(["chain", "boxes", "image"], alias="return", min_length=1)
        stream: bool = False

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, prompt: str) -> str:
            if not prompt.strip():
                raise ValueError("the prompt is blank")
            return prompt

        @field_validator("text_temperature", "image_temperature")
        @classmethod
        def _zero_or_normal(cls, t: float) -> float:
            if 0 < t < MIN_TEMPERATURE:
                raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
            return t

    return GenerateRequest


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyLimit:
    """Refuses a request body over `limit` bytes while it is read, before it is buffered or parsed: at the first
    read if its Content-Length is over, else (chunked) once the bytes received pass it. The 413 is raised inside
    the read, so the app's handler answers it in the server's format (FastAPI's own `max_body_size` answers a
    Content-Length over the limit in plain text, replacing whatever the app responds)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if length.isdigit() and int(length) > self.limit:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, receive_within_limit, send)

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the request body is larger than {self.limit} bytes")


class _Lease:
    """A request's in-flight slot, released exactly once (answer, failure or disconnect); releasing it before
    the engine finished the request aborts it there. It also counts the request's outcome exactly once: the
    handler settles it when it answers, and a slot released unanswered (the client left, the handler was
    cancelled) counts as cancelled, whatever the engine does with the request afterwards."""

    def __init__(self, server: "GoTServer", job: Job):
        self.server, self.job = server, job
        self.finished = self.released = False
        self.outcome: str | None = None
        server.in_flight += 1
        server.metrics.in_flight.set(server.in_flight)
        self.watcher: asyncio.Task | None = None

    def watch(self, request: Request) -> None:
        """Release when the client disconnects (read from the ASGI receive channel, the body being consumed)."""
        async def until_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.release()

        self.watcher = asyncio.create_task(until_disconnect())

    def count(self, outcome: str) -> None:
        """Count the request under `outcome` in `gotr1_requests_total`, unless it was counted already."""
        if self.outcome is None:
            self.outcome = outcome
            self.server.metrics.requests_total.inc(label_value=outcome)

    def release(self) -> None:
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        if self.released:
            return
        self.released = True
        self.count("cancelled")  # a no-op once answered
        self.server.in_flight -= 1
        self.server.metrics.in_flight.set(self.server.in_flight)
        if not self.finished:
            self.server.worker.cancel(self.job)


@contextlib.contextmanager
def _frozen_heap():
    """While serving, the garbage collector skips what exists at startup (vLLM's `freeze_gc_heap`): a full
    collection otherwise walks the model, tokenizer and app objects, a 250 ms pause of the whole process on the
    tiny preset on a CPU, which the open-loop benchmark saw as a request's time to first token. Objects made later
    are still collected; leaving unfreezes, so a process that stops serving collects as before."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class GoTServer:
    """The engine, its thread, the metrics and the FastAPI app (`.app`) that serves them."""

    def __init__(self, bundle: JanusBundle, engine_config: EngineConfig | None = None,
                 config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        bundle.model.eval()
        self.bundle = bundle
        self.engine = LLMEngine(bundle, engine_config)
        self._warm_up()
        self.metrics = ServerMetrics(self.engine.block_manager.num_blocks)
        self.worker = EngineWorker(self.engine, self.metrics, interrupt_windows=self.config.interrupt_windows)
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="gotr1-decode")  # one decode at a time
        # Streams detokenize on the event loop: with their own tokenizer, never borrowed by the engine thread.
        self.stream_bundle = dataclasses.replace(bundle, tokenizer=copy.deepcopy(bundle.tokenizer))
        self.in_flight = 0
        self.shutting_down = False
        self.app = self._build_app()

    def _warm_up(self) -> None:
        """One request through the engine and the image decoder before serving: kernels compile and CUDA graphs
        are captured now, never while the decoder thread runs beside the engine (a capture must run alone)."""
        [out] = self.engine.generate(["warm up"], SamplingParams(n=1, max_reasoning_tokens=1, decode_images=False),
                                     use_tqdm=False)
        self.bundle.decode_images(out.samples[0].image_tokens[None])

    def _images(self, output, returns: list[str]) -> list[dict[str, str]]:
        """The decoder thread's work for one finished request: VQ-decode its samples, encode the PNGs."""
        tokens = torch.stack([s.image_tokens for s in output.samples])
        return encode_images(output, self.bundle.decode_images(tokens), returns)

    async def _decode(self, lease: _Lease, event: FinishedEvent, returns: list[str] | None):
        """(per-sample PNGs, or None without `returns` or once the client left; timing). The time to image is
        taken once the PNGs exist. A decode whose client left while it queued behind others is skipped: its slot
        is free already, so clients leaving after their last token would otherwise queue decodes without bound."""
        def images_if_wanted():
            return None if lease.released else self._images(event.output, returns)

        images = None
        if returns is not None:
            images = await asyncio.get_running_loop().run_in_executor(self.decoder, images_if_wanted)
        done = time.perf_counter() - lease.job.arrival
        if images is not None:  # without images it would be the time to the last token again
            self.metrics.time_to_image.observe(done)
        return images, {"time_to_first_token_s": event.time_to_first_token_s,
                        "time_to_last_token_s": event.time_to_last_token_s, "time_to_image_s": done}

    def shut_down(self) -> None:
        """Refuse new requests (503) and have the engine thread answer those it holds or has not read yet with a
        503 and abort them, freeing their KV blocks. Images being decoded still finish."""
        if not self.shutting_down:
            self.shutting_down = True
            self.worker.stop()

    def health(self) -> dict:
        m = self.metrics
        return {"status": "ok" if self.worker.alive else "engine stopped", "model": self.bundle.name,
                "queue_depth": int(m.queue_depth.get()), "running_groups": int(m.running_groups.get()),
                "in_flight": self.in_flight, "kv_blocks_used": int(m.kv_blocks_used.get()),
                "kv_blocks_free": int(m.kv_blocks_free.get()), "kv_blocks_total": int(m.kv_blocks_total.get())}

    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            with _frozen_heap():
                self.worker.start()
                try:
                    yield
                finally:
                    self.shut_down()  # done already when `_Server` runs the app; not under other ASGI servers
                    await asyncio.to_thread(self.worker.join)
                    self.decoder.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="gotr1", description=__doc__, lifespan=lifespan)
        app.add_middleware(_BodyLimit, limit=self.config.max_body_bytes)
        Body = request_model(self.config, self.bundle)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            self.metrics.requests_total.inc(label_value="invalid")
            errors = exc.errors()
            if any(e["type"] == "json_invalid" for e in errors):
                return error(400, "the request body is not valid JSON")
            message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors)
            return JSONResponse({"error": message, "detail": [{k: e[k] for k in ("loc", "msg", "type")}
                                                              for e in errors]}, status_code=422)

        @app.exception_handler(StarletteHTTPException)
        async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            """FastAPI's own refusals (a body its JSON parser gives up on, an unknown route) and `_BodyLimit`'s, in
            our format. A generation request refused for its body counts as invalid, as a malformed one does."""
            if request.url.path == GENERATE_PATH and exc.status_code in (400, 413):
                self.metrics.requests_total.inc(label_value="invalid")
            return error(exc.status_code, str(exc.detail), headers=exc.headers)

        @app.post(GENERATE_PATH)
        async def generate(body: Body, request: Request) -> Response:  # type: ignore[valid-type]
            return await self._generate(body, request)

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse(self.health(), status_code=200 if self.worker.alive else 503)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        return app

    def _shed(self) -> JSONResponse:
        """A request the stopping server will not run: 503, counted apart from failures (a retry elsewhere
        succeeds)."""
        self.metrics.requests_total.inc(label_value="shutdown")
        return error(503, SHUTTING_DOWN)

    async def _generate(self, body, request: Request) -> Response:
        if self.shutting_down:
            return self._shed()
        if not self.worker.alive:
            self.metrics.requests_total.inc(label_value="unavailable")
            return error(503, "the engine is not running")
        if self.in_flight >= self.config.max_queue:
            self.metrics.requests_total.inc(label_value="queue_full")
            return error(429, f"the server is full ({self.config.max_queue} requests in flight); retry later",
                         headers={"Retry-After": "1"})
        returns = list(dict.fromkeys(body.returns))
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        images = any(p in returns for p in IMAGE_PARTS)  # made by the decoder thread, not by the engine
        try:
            params = SamplingParams(
                n=body.n, text_temperature=body.text_temperature, image_temperature=body.image_temperature,
                top_k=body.top_k, top_p=body.top_p, cfg_weight=body.cfg_weight,
                max_reasoning_tokens=body.max_reasoning_tokens, min_reasoning_tokens=body.min_reasoning_tokens,
                seed=seed, decode_images=False)
        except ValueError as e:
            self.metrics.requests_total.inc(label_value="invalid")
            return error(422, str(e))
        job = Job(uuid.uuid4().hex, body.prompt, params, body.stream, asyncio.get_running_loop())
        lease = _Lease(self, job)
        lease.watch(request)
        streaming = False
        try:
            self.worker.submit(job)
            try:
                await job.admitted
            except ValueError as e:  # the engine's own checks: prompt too long, can never fit the KV cache
                lease.finished = True
                lease.count("invalid")
                return error(422, f"request refused: {e}")
            except RuntimeError as e:  # the engine thread stopped (shutdown) or died before reading the request
                lease.finished = True
                lease.count("shutdown" if self.shutting_down else "unavailable")
                return error(503, SHUTTING_DOWN if self.shutting_down else str(e))
            if body.stream:
                streaming = True
                return StreamingResponse(self._stream(job, lease, returns, images, seed),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Request-Id": job.id,
                                                  "X-Seed": str(seed)})
            while isinstance(event := await job.events.get(), TokensEvent):
                pass
            lease.finished = True
            if isinstance(event, FailedEvent):
                lease.count(event.outcome)
                return error(event.status, event.message)
            try:
                pngs, timing = await self._decode(lease, event, returns if images else None)
            except Exception as e:  # the decoder failed (out of memory, say): the tokens exist, the images do not
                lease.count("failed")
                return error(500, f"image decoding failed: {e!r}")
            response = JSONResponse(response_json(event.output, seed=seed, returns=returns, images=pngs,
                                                  timing=timing))
            lease.count("completed")
            return response
        except Exception:  # a bug: Starlette answers a bare 500
            lease.count("failed")
            raise
        finally:
            if not streaming:
                lease.release()

    async def _stream(self, job: Job, lease: _Lease, returns: list[str], images: bool, seed: int):
        state = StreamState(self.stream_bundle, job.params.n)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, TokensEvent):
                    yield state.tokens(event.new_ids)
                    continue
                lease.finished = True
                if isinstance(event, FailedEvent):
                    lease.count(event.outcome)
                    yield sse("error", {"error": event.message, "status": event.status})
                    return
                assert isinstance(event, FinishedEvent)
                if late := state.catch_up(event.output):
                    yield late
                try:
                    pngs, timing = await self._decode(lease, event, returns if images else None)
                except Exception as e:  # as in `_generate`, but the status line is long sent: an error event
                    lease.count("failed")
                    yield sse("error", {"error": f"image decoding failed: {e!r}", "status": 500})
                    return
                if pngs is not None:
                    yield "".join(sse("image", {"sample": i, **im}) for i, im in enumerate(pngs))
                done = sse("done", response_json(event.output, seed=seed, returns=returns, timing=timing))
                lease.count("completed")
                yield done
                return
        except Exception:  # a bug: the stream breaks off
            lease.count("failed")
            raise
        finally:
            lease.release()


def create_app(bundle: JanusBundle, engine_config: EngineConfig | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread. `app.state.server` is the `GoTServer`."""
    server = GoTServer(bundle, engine_config, config)
    server.app.state.server = server
    return server.app


class _Server(uvicorn.Server):
    """uvicorn for an app of `create_app`, telling the app that shutdown began before uvicorn gives up on its
    requests. uvicorn 0.54's `Server.shutdown` (uvicorn/server.py; reached from `should_exit`, which SIGINT and
    SIGTERM set) closes the listeners, asks each connection to close after its current response, waits up to
    `timeout_graceful_shutdown` for them, then cancels the request tasks left (a plain request gets uvicorn's
    bare-text 500, a stream ends with no `error` event) and only then runs the lifespan's exit: too late to answer
    them. Shutting the `GoTServer` down first answers each within an engine step, which ends that wait early."""

    def __init__(self, app: FastAPI, **config):
        super().__init__(uvicorn.Config(app, **config))
        self.got: GoTServer = app.state.server

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.got.shut_down()
        await super().shutdown(sockets)


def serve(bundle: JanusBundle, *, host: str = "127.0.0.1", port: int = 8000,
          engine_config: EngineConfig | None = None, config: ServerConfig | None = None) -> None:
    """Serve until interrupted (what `gotr1 serve` runs)."""
    server = _Server(create_app(bundle, engine_config, config), host=host, port=port, log_level="info",
                     timeout_graceful_shutdown=10)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT that stopped it (as `uvicorn.run`)
        server.run()


class BackgroundServer:
    """uvicorn in a daemon thread, on a socket bound here first (port 0 picks a free port, with no race):
    for tests and benchmarks that need a real server on loopback. `app` comes from `create_app`. Use as a context
    manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0):
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then; without it Nagle plus
        # delayed ACKs add 40 ms to every response on a kept-alive connection.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _Server(app, log_level="warning", timeout_graceful_shutdown=5)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="gotr1-http")
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not start on {host}:{self.port} within {startup_timeout_s} s")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
