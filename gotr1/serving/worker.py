"""The engine thread: the only code that touches the `LLMEngine`.

HTTP handlers run on an asyncio loop and talk to the engine through one thread-safe inbox (add / abort); the
thread answers each request through its own asyncio queue (`loop.call_soon_threadsafe`). Between two engine
steps it drains the inbox, so a new request joins the running batch at the next step (continuous batching) and
an abort frees its KV blocks before the next step allocates any. A command that arrives during a multi-step
decode window ends the window at its next step (`interrupt_windows`), so a new request's prefill waits for one
decode step, not for the rest of the window (up to `num_scheduler_steps` steps, or an image phase for a window
of image rows alone). When nothing is pending it blocks on the inbox.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.outputs import GroupOutput
from engine.sampling_params import SamplingParams
from gotr1.serving.metrics import ServerMetrics

log = logging.getLogger("gotr1.serve")


@dataclass(frozen=True, slots=True)
class TokensEvent:
    """New reasoning ids since the last event, per sample index (streaming requests only)."""

    new_ids: list[tuple[int, list[int]]]


@dataclass(frozen=True, slots=True)
class FinishedEvent:
    """Every token of the request (images not decoded: the server decodes them off the engine thread)."""

    output: GroupOutput
    time_to_first_token_s: float
    time_to_last_token_s: float


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """The request ended without a result; `status` answers a plain request (499: its client cancelled it, 503:
    the server is shutting down, 500: the engine failed) and `outcome` is its `gotr1_requests_total` label (the
    handler counts it: only it knows whether an answer reached the client first)."""

    message: str
    status: int = 500
    outcome: str = "failed"


@dataclass(eq=False)
class Job:
    """One HTTP request on its way through the engine. The handler's side: `admitted` (settled once the engine
    accepted or refused the request) and `events`; the engine thread's side: what it already streamed."""

    id: str
    prompt: str
    params: SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    admitted: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False, default_factory=asyncio.Queue)
    streamed: list[int] = field(init=False)  # engine thread: reasoning ids already sent, per sample
    first_token_at: float | None = None  # engine thread

    def __post_init__(self) -> None:
        self.admitted = self.loop.create_future()
        self.streamed = [0] * self.params.n

    def post(self, event: TokensEvent | FinishedEvent | FailedEvent) -> None:
        """Deliver `event` to the handler (called from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the handler gave up waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


_STOP = object()
SHUTTING_DOWN = "the server is shutting down"


class EngineWorker:
    """Owns the engine and the thread that steps it."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, interrupt_windows: bool = True):
        self.engine = engine
        self.metrics = metrics
        self.interrupt_windows = interrupt_windows
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[str, Job] = {}  # engine thread only: admitted and unfinished
        self.fatal: BaseException | None = None
        self._exited = False  # set by the engine thread once it reads no more commands
        self._thread = threading.Thread(target=self._run, name="gotr1-engine", daemon=True)
        self._snapshot()

    # -------------------------------------------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Without waiting: the thread answers every request it holds or has not read yet with a 503
        `SHUTTING_DOWN`, aborts them in the engine (their KV blocks return) and exits."""
        self.inbox.put(_STOP)

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))
        if self._exited:  # nobody reads the inbox any more: answer what is in it (this job, at least)
            self._refuse(self._drain([]), "the engine is not running")

    def cancel(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    # -------------------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        commands: list = []
        try:
            while True:
                commands = self._drain([] if self.engine.has_unfinished() else [self.inbox.get()])
                if _STOP in commands:
                    self._shut_down(commands)
                    return
                for kind, job in commands:
                    self._add(job) if kind == "add" else self._abort(job)
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # a bug: say so on /health and to every waiting request, then stop
            log.exception("engine thread died")
            self.fatal = e
            self._fail_all(f"engine thread died: {e!r}")
            raise
        finally:
            # Requests read in the last iteration but not added, and any still queued, would await admission
            # forever; `submit` answers those that arrive from now on.
            self._exited = True
            self._refuse(self._drain(commands), "the engine is not running" if self.fatal is None else
                         f"engine thread died: {self.fatal!r}")

    def _add(self, job: Job) -> None:
        try:
            self.engine.add_request(job.prompt, job.params, job.id)
        except Exception as e:  # ValueError: refused (too long, can never fit); anything else: a bug
            job.loop.call_soon_threadsafe(_settle, job.admitted, e)
            return
        self.jobs[job.id] = job
        job.loop.call_soon_threadsafe(_settle, job.admitted, None)

    def _abort(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is None:  # finished (or refused) before the abort arrived
            return
        self.engine.abort(job.id)
        self._publish([(job, FailedEvent("request cancelled", status=499, outcome="cancelled"))])

    def _has_commands(self) -> bool:
        return not self.inbox.empty()

    def _step(self) -> None:
        start, forwards = time.perf_counter(), self.engine.num_steps
        try:
            outputs = self.engine.step(interrupt=self._has_commands if self.interrupt_windows else None)
        except Exception as e:
            log.exception("engine step failed; failing its requests")
            self._fail_all(f"engine step failed: {e!r}")
            return
        now = time.perf_counter()
        self.metrics.step_seconds.observe(now - start)
        self.metrics.steps_total.inc(self.engine.num_steps - forwards)  # a decode window runs several
        events: list[tuple[Job, TokensEvent | FinishedEvent]] = []
        for out in outputs:
            job = self.jobs.pop(out.request_id)
            first = job.first_token_at if job.first_token_at is not None else now
            tokens = sum(len(s.reasoning_ids) + len(s.image_tokens) for s in out.samples)
            self.metrics.generated_tokens_total.inc(tokens)
            self.metrics.tokens_rate.add(tokens)
            self.metrics.time_to_first_token.observe(first - job.arrival)
            events.append((job, FinishedEvent(out, first - job.arrival, now - job.arrival)))
        for job in self.jobs.values():
            if job.first_token_at is not None and not job.stream:
                continue
            progress = self.engine.progress(job.id)
            if job.first_token_at is None and progress[0][0]:  # a group's prefill gives every sample its first
                job.first_token_at = now
            if job.stream:
                new = [(i, ids[job.streamed[i]:]) for i, (ids, _) in enumerate(progress)
                       if len(ids) > job.streamed[i]]
                for i, ids in new:
                    job.streamed[i] += len(ids)
                if new:
                    events.append((job, TokensEvent(new)))
        self._publish(events)

    def _shut_down(self, commands: list) -> None:
        self._refuse(commands, SHUTTING_DOWN)
        self._fail_all(SHUTTING_DOWN, outcome="shutdown", status=503)

    def _drain(self, commands: list) -> list:
        """`commands` with everything queued in the inbox appended, without waiting."""
        while True:
            try:
                commands.append(self.inbox.get_nowait())
            except queue.Empty:
                return commands

    @staticmethod
    def _refuse(commands: list, message: str) -> None:
        """Refuse the adds among `commands` (a job already admitted or refused is left alone)."""
        for command in commands:
            if command is not _STOP and command[0] == "add":
                command[1].loop.call_soon_threadsafe(_settle, command[1].admitted, RuntimeError(message))

    def _fail_all(self, message: str, outcome: str = "failed", status: int = 500) -> None:
        events, broken = [], None
        for job in self.jobs.values():
            try:
                self.engine.abort(job.id)
            except KeyError:
                pass
            except Exception as e:  # the engine's state is broken: answer every request, then stop the thread
                broken = broken or e
            events.append((job, FailedEvent(message, status, outcome)))
        self.jobs.clear()
        self._publish(events)
        if broken is not None:
            raise broken

    def _publish(self, events: list[tuple[Job, TokensEvent | FinishedEvent | FailedEvent]]) -> None:
        """Gauges first, then the events: a client reacting to an event reads gauges at least that new."""
        self._snapshot()
        for job, event in events:
            job.post(event)

    def _snapshot(self) -> None:
        """Gauges that only the engine thread may read, published after every iteration."""
        m, bm = self.metrics, self.engine.block_manager
        waiting = sum(1 for j in self.jobs.values() if j.first_token_at is None)
        m.queue_depth.set(waiting)
        m.running_groups.set(len(self.jobs) - waiting)
        m.kv_blocks_used.set(bm.num_used_blocks)
        m.kv_blocks_free.set(bm.num_free_blocks)
