"""Prometheus text exposition (format 0.0.4) for the server, written by hand: three metric kinds need no
client library. Metrics are updated by the engine thread and the event loop and rendered by the event loop, so
each one guards its state with a lock."""
from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Gauge:
    """A value set from outside (a snapshot), optionally per label value."""

    kind = "gauge"

    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label = name, help, label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def set(self, value: float, label_value: str = "") -> None:
        with self._lock:
            self._values[label_value] = float(value)

    def get(self, label_value: str = "") -> float:
        with self._lock:
            return self._values.get(label_value, 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label:
            items = [("", 0.0)]
        return [f"{self.name}{_labels({self.label: k} if self.label else {})} {_num(v)}" for k, v in items]


class Counter(Gauge):
    """A monotonically increasing total (Prometheus computes rates from it)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up, got {amount}")
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"histogram buckets must be strictly increasing, got {buckets}")
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    @property
    def sum(self) -> float:
        with self._lock:
            return self._sum

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = [], 0
        for le, c in zip((*self.buckets, math.inf), counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_num(le)}"}} {running}')
        return lines + [f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]


class Rate:
    """Events per second over a sliding window (the `tokens/s` gauge a dashboard shows without PromQL)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, amount: float, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, amount))

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(a for _, a in self._events) / self.window_s


def render(metrics: list[Gauge | Histogram]) -> str:
    """The exposition text of `metrics`, in order."""
    out = []
    for m in metrics:
        out.append(f"# HELP {m.name} {m.help}")
        out.append(f"# TYPE {m.name} {m.kind}")
        out.extend(m.samples())
    return "\n".join(out) + "\n"


class ServerMetrics:
    """Everything `GET /metrics` exposes. Gauges of engine state are set by the engine thread after each step
    (only it may read the engine); counters and histograms are updated where the event happens."""

    def __init__(self, num_kv_blocks: int):
        self.queue_depth = Gauge("gotr1_queue_depth", "Requests admitted and waiting for their prompt prefill.")
        self.running_groups = Gauge("gotr1_running_groups", "Requests (groups of n samples) being decoded.")
        self.in_flight = Gauge("gotr1_requests_in_flight", "Requests accepted and not answered yet (max_queue "
                                                           "bounds it; beyond it requests get 429).")
        self.kv_blocks_used = Gauge("gotr1_kv_blocks_used", "KV cache blocks held by requests.")
        self.kv_blocks_free = Gauge("gotr1_kv_blocks_free", "KV cache blocks in the free pool.")
        # Not `_total`: Prometheus reserves the suffix for counters (promtool's lint refuses it on a gauge).
        self.kv_blocks_total = Gauge("gotr1_kv_blocks_capacity", "KV cache blocks in the pool.")
        self.kv_blocks_total.set(num_kv_blocks)
        self.tokens_per_second = Gauge("gotr1_tokens_per_second", "Generated tokens (reasoning + image) of the "
                                                                  "requests finished over the last 10 s, per s.")
        self.tokens_rate = Rate(10.0)
        self.generated_tokens_total = Counter("gotr1_generated_tokens_total", "Tokens (reasoning + image) of "
                                                                              "finished requests.")
        # Each answer to POST /v1/generate counts once, under the outcome its handler settled on.
        self.requests_total = Counter("gotr1_requests_total", "Requests to /v1/generate by outcome: completed, "
                                      "cancelled (the client left before its answer), failed (the engine or the "
                                      "image decoder failed), invalid, queue_full, shutdown (shed by a stopping "
                                      "server), unavailable (the engine thread is not running).", label="outcome")
        self.steps_total = Counter("gotr1_engine_steps_total", "Engine steps (one forward each; a multi-step "
                                                               "decode window runs several).")
        self.time_to_first_token = Histogram("gotr1_time_to_first_token_seconds",
                                             "Arrival to the first reasoning token of a finished request.")
        self.time_to_image = Histogram("gotr1_time_to_image_seconds",
                                       "Arrival to the decoded images of a finished request.")
        self.step_seconds = Histogram("gotr1_engine_step_seconds", "Duration of one scheduled batch: a prefill, "
                                      "or a decode window of up to num_scheduler_steps steps (image-only "
                                      "windows: num_image_scheduler_steps).",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))

    def render(self) -> str:
        self.tokens_per_second.set(self.tokens_rate.per_second())
        return render([self.queue_depth, self.running_groups, self.in_flight, self.kv_blocks_used,
                       self.kv_blocks_free, self.kv_blocks_total, self.tokens_per_second,
                       self.generated_tokens_total, self.requests_total, self.steps_total,
                       self.time_to_first_token, self.time_to_image, self.step_seconds])
