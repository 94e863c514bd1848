"""The HTTP server against the offline engine, on a real uvicorn on loopback (tiny preset, 64 px = 16 image
tokens, short chains). Every wait is bounded: client timeouts, polls with deadlines, joins with timeouts."""
import base64
import gc
import http.client
import io
import json
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from gotr1.cli import build_parser, main
from gotr1.model import build_preset, load_adapter
from gotr1.serving import BackgroundServer, ServerConfig, create_app
from gotr1.serving.metrics import Histogram, ServerMetrics
from gotr1.serving.responses import IncrementalDetokenizer
from gotr1.serving.worker import EngineWorker

PROMPTS = ["a red cat on a blue table", "two green squares", "a small dog in front of a large house",
           "three purple stars above a white circle"]
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", image_size=64)


def _start(bundle, engine_config, config):
    app = create_app(bundle, engine_config, config)
    return BackgroundServer(app), app.state.server


@pytest.fixture(scope="module")
def main_server(tiny):
    srv, state = _start(tiny, EngineConfig(num_kv_blocks=512, block_size=16), ServerConfig(max_n=4, max_queue=32))
    with srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        yield client, state
    assert not srv.thread.is_alive() and not state.worker._thread.is_alive()


@pytest.fixture(scope="module")
def tight_server(tiny):
    """One request in flight at most, 64 blocks of 16 tokens."""
    srv, state = _start(tiny, EngineConfig(num_kv_blocks=64, block_size=16), ServerConfig(max_n=4, max_queue=1))
    with srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        yield client, state
    assert not srv.thread.is_alive()


def sse_events(lines):
    """(event, data) pairs of a server-sent-event stream."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def wait_until(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def metric(client, line_prefix):
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return 0.0


def raw_post(client, headers, timeout_s=10.0):
    """A connection that sent `POST /v1/generate` with `headers` (CRLF-ended lines) and no body byte yet."""
    sock = socket.create_connection((client.base_url.host, client.base_url.port), timeout=timeout_s)
    sock.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
                 .encode())
    return sock


def read_response(sock):
    """(status, JSON body) of the response on a `raw_post` connection."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, json.loads(r.read())


def png_array(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def request_body(i):
    """Request i of the concurrency test: mixed n, sampling settings and chain lengths."""
    return dict(prompt=PROMPTS[i % len(PROMPTS)], n=1 + i % 2, seed=1000 + i, max_reasoning_tokens=4 + i % 5,
                min_reasoning_tokens=i % 3, text_temperature=[1.0, 0.7, 0.0][i % 3], image_temperature=1.0,
                top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i // 8], cfg_weight=[5.0, 2.0][i % 2])


def params_of(body, decode_images=True):
    return SamplingParams(**{k: v for k, v in body.items() if k not in ("prompt", "return", "stream")},
                          decode_images=decode_images)


def assert_sample_equals(got, want):
    assert got["reasoning_ids"] == want.reasoning_ids
    assert got["image_tokens"] == want.image_tokens.tolist()
    assert got["chain"] == want.reasoning_text and got["boi_forced"] == want.boi_forced
    assert got["boxes"] == [{"name": o.name, "box": list(o.box)} for o in want.chain.objects]
    if "image" in got:
        np.testing.assert_array_equal(png_array(got["image"]), np.asarray(want.image))


# ------------------------------------------------------------------------------------------------ end to end
def test_16_concurrent_requests_equal_offline_engine(tiny, main_server):
    client, state = main_server
    bodies = [request_body(i) for i in range(16)]
    offline = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16)).generate(
        [b["prompt"] for b in bodies], [params_of(b) for b in bodies], use_tqdm=False)
    steps_before = metric(client, "gotr1_engine_steps_total")

    def post(body):
        return client.post("/v1/generate", json={**body, "return": ["chain", "boxes", "tokens", "image"]})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, bodies, timeout=120))
    steps = metric(client, "gotr1_engine_steps_total") - steps_before
    for body, r, want in zip(bodies, responses, offline):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["seed"] == body["seed"] and got["prompt"] == body["prompt"] and len(got["samples"]) == body["n"]
        for g, w in zip(got["samples"], want.samples):
            assert_sample_equals(g, w)
        t = got["timing"]
        assert 0 < t["time_to_first_token_s"] < t["time_to_last_token_s"] <= t["time_to_image_s"]
    # Batched: one request alone takes at least 1 + 5 + 16 steps; sixteen in sequence would take >= 352.
    assert steps < 16 * 22 / 2
    health = client.get("/health").json()
    assert health["kv_blocks_free"] == health["kv_blocks_total"] and health["in_flight"] == 0


def test_streaming_sends_tokens_then_boxes_then_images(tiny, main_server):
    client, _ = main_server
    body = dict(prompt=PROMPTS[0], n=2, seed=7, max_reasoning_tokens=8, min_reasoning_tokens=8)
    [want] = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16)).generate(
        [body["prompt"]], params_of(body), use_tqdm=False)
    with client.stream("POST", "/v1/generate", json={**body, "stream": True,
                                                     "return": ["chain", "boxes", "tokens", "image", "layout"]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-seed"] == "7"
        events = list(sse_events(r.iter_lines()))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and "error" not in kinds
    first_image = kinds.index("image")
    assert kinds.index("token") < first_image and kinds.count("image") == 2
    done = events[-1][1]
    for i, w in enumerate(want.samples):
        mine = [(n, k, d) for n, (k, d) in enumerate(events) if d.get("sample") == i]
        tokens = [d for _, k, d in mine if k == "token"]
        assert [d["id"] for d in tokens] == w.reasoning_ids  # 8 chain tokens, <begin_of_image> last
        assert "".join(d["text"] for d in tokens) == w.reasoning_text
        [(at_boxes, _, boxes)] = [m for m in mine if m[1] == "boxes"]
        [(at_image, _, image)] = [m for m in mine if m[1] == "image"]
        assert max(n for n, k, _ in mine if k == "token") < at_boxes < at_image
        assert boxes["chain"] == w.reasoning_text and boxes["problems"] == w.chain.problems
        assert boxes["boxes"] == [{"name": o.name, "box": list(o.box)} for o in w.chain.objects]
        np.testing.assert_array_equal(png_array(image["image"]), np.asarray(w.image))
        assert png_array(image["layout"]).shape == (256, 512, 3)  # image with boxes | layout alone, enlarged 4x
        assert_sample_equals(done["samples"][i], w)
        assert "image" not in done["samples"][i]  # sent once, in the image event


def test_client_disconnect_cancels_and_returns_every_block(main_server):
    """A non-streaming request whose client gives up: the engine aborts it and the pool refills."""
    client, state = main_server
    total = client.get("/health").json()["kv_blocks_total"]
    cancelled = metric(client, 'gotr1_requests_total{outcome="cancelled"}')
    # 1500 decode steps: several times the read timeout even on a fast machine.
    body = dict(prompt=PROMPTS[1], n=4, seed=3, max_reasoning_tokens=1500, min_reasoning_tokens=1500)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(client.base_url.join("/v1/generate"), json=body, timeout=httpx.Timeout(60.0, read=0.2))
    assert wait_until(lambda: metric(client, 'gotr1_requests_total{outcome="cancelled"}') == cancelled + 1)
    assert wait_until(lambda: client.get("/health").json()["kv_blocks_free"] == total)
    assert client.get("/health").json()["in_flight"] == 0


def test_stream_disconnect_full_queue_and_never_fit(tight_server):
    client, state = tight_server
    total = client.get("/health").json()["kv_blocks_total"]
    r = client.post("/v1/generate", json=dict(prompt=PROMPTS[0], max_reasoning_tokens=600))
    assert r.status_code == 422 and "can never fit the KV cache" in r.json()["error"]
    long = dict(prompt=PROMPTS[0], seed=1, max_reasoning_tokens=250, min_reasoning_tokens=250, stream=True)
    with client.stream("POST", "/v1/generate", json=long) as stream:
        assert stream.status_code == 200
        events = sse_events(stream.iter_lines())  # held: a dropped line iterator closes the connection
        kind, first = next(events)
        assert kind == "token" and first["sample"] == 0
        health = client.get("/health").json()
        assert health["in_flight"] == 1 and health["kv_blocks_used"] > 0
        full = client.post("/v1/generate", json=dict(prompt=PROMPTS[1], max_reasoning_tokens=4))
        assert full.status_code == 429 and "full" in full.json()["error"] and full.headers["retry-after"] == "1"
    # The stream is closed mid-reasoning: the request is aborted and every block returns.
    assert wait_until(lambda: client.get("/health").json()["kv_blocks_free"] == total)
    assert metric(client, 'gotr1_requests_total{outcome="cancelled"}') == 1
    assert metric(client, 'gotr1_requests_total{outcome="queue_full"}') == 1
    r = client.post("/v1/generate", json=dict(prompt=PROMPTS[1], max_reasoning_tokens=4))  # a free slot again
    assert r.status_code == 200 and client.get("/health").json()["in_flight"] == 0


def test_engine_failure_answers_500_and_the_server_recovers(tight_server, monkeypatch):
    client, state = tight_server

    def broken_step(interrupt=None):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(state.engine, "step", broken_step)
    r = client.post("/v1/generate", json=dict(prompt=PROMPTS[0], max_reasoning_tokens=4))
    assert r.status_code == 500 and "injected fault" in r.json()["error"]
    monkeypatch.undo()
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["kv_blocks_free"] == health["kv_blocks_total"]
    assert client.post("/v1/generate", json=dict(prompt=PROMPTS[0], max_reasoning_tokens=4)).status_code == 200


BAD_INPUTS = [
    ({}, 422, "prompt: Field required"),
    ({"prompt": ""}, 422, "at least 1 character"),
    ({"prompt": "  \n"}, 422, "the prompt is blank"),
    ({"prompt": "x" * 2001}, 422, "prompt: String should have at most 2000 characters"),
    ({"prompt": "a " * 900, "max_reasoning_tokens": 1200}, 422, "prompt 0 is too long"),
    ({"prompt": "a <begin_of_image> b"}, 422, "contains the special token '<begin_of_image>'"),
    ({"prompt": "a", "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ({"prompt": "a", "n": 5}, 422, "n: Input should be less than or equal to 4"),
    ({"prompt": "a", "n": 1.5}, 422, "n: Input should be a valid integer"),
    ({"prompt": "a", "n": "2"}, 422, "n: Input should be a valid integer"),
    ({"prompt": "a", "n": True}, 422, "n: Input should be a valid integer"),
    ({"prompt": "a", "temperature": 0.5}, 422, "temperature: Extra inputs are not permitted"),
    ({"prompt": "a", "text_temperature": -0.1}, 422, "text_temperature: Input should be greater than or equal"),
    ({"prompt": "a", "image_temperature": "hot"}, 422, "image_temperature: Input should be a valid number"),
    ({"prompt": "a", "top_p": 0}, 422, "top_p: Input should be greater than 0"),
    ({"prompt": "a", "top_p": 1.5}, 422, "top_p: Input should be less than or equal to 1"),
    ({"prompt": "a", "top_k": -1}, 422, "top_k: Input should be greater than or equal to 0"),
    ({"prompt": "a", "cfg_weight": -1}, 422, "cfg_weight: Input should be greater than or equal to 0"),
    ({"prompt": "a", "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "a", "max_reasoning_tokens": 10**6}, 422, "max_reasoning_tokens: Input should be less than"),
    ({"prompt": "a", "max_reasoning_tokens": 3, "min_reasoning_tokens": 5}, 422, "min_reasoning_tokens must be"),
    ({"prompt": "a", "return": ["video"]}, 422, "return.0: Input should be"),
    ({"prompt": "a", "return": []}, 422, "return: List should have at least 1 item"),
    ({"prompt": "a", "stream": "yes"}, 422, "stream: Input should be a valid boolean"),
    ('{"prompt": "a", "cfg_weight": NaN}', 422, "cfg_weight: Input should be a finite number"),
    ('{"prompt": "a", "cfg_weight": Infinity}', 422, "cfg_weight: Input should be a finite number"),
    ('{"prompt": "a",', 400, "not valid JSON"),
    ('["a cat"]', 422, "Input should be a valid dictionary"),
]


@pytest.mark.parametrize("body,status,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_gets_its_4xx(main_server, body, status, message):
    client, _ = main_server
    invalid = metric(client, 'gotr1_requests_total{outcome="invalid"}')
    if isinstance(body, str):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert metric(client, 'gotr1_requests_total{outcome="invalid"}') == invalid + 1


def test_health_and_metrics_format(main_server):
    client, _ = main_server
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {line.split()[2]: line.split()[3] for line in r.text.splitlines() if line.startswith("# TYPE")}
    for name in ("gotr1_queue_depth", "gotr1_running_groups", "gotr1_kv_blocks_used", "gotr1_kv_blocks_free",
                 "gotr1_tokens_per_second"):
        assert families[name] == "gauge"
    for name in ("gotr1_time_to_first_token_seconds", "gotr1_time_to_image_seconds", "gotr1_engine_step_seconds"):
        assert families[name] == "histogram"
        assert metric(client, f'{name}_bucket{{le="+Inf"}}') == metric(client, f"{name}_count")


def test_a_body_over_the_limit_gets_413_while_it_arrives(main_server):
    """The whole body was read and parsed before any check: a client could make the server buffer and parse
    gigabytes. Now a Content-Length over `max_body_bytes` is refused before a body byte arrives, and a chunked
    body as soon as its bytes pass the limit, before it ends."""
    client, state = main_server
    limit = state.config.max_body_bytes
    small = json.dumps(dict(prompt=PROMPTS[0], max_reasoning_tokens=2, **{"return": ["tokens"]})).encode()
    at_limit = client.post("/v1/generate", content=small + b" " * (limit - len(small)),
                           headers={"content-type": "application/json"})
    assert at_limit.status_code == 200, at_limit.text
    too_large = {"error": f"the request body is larger than {limit} bytes"}
    invalid = metric(client, 'gotr1_requests_total{outcome="invalid"}')
    with raw_post(client, f"Content-Length: {limit + 1}\r\n") as sock:
        assert read_response(sock) == (413, too_large)
    with raw_post(client, "Transfer-Encoding: chunked\r\n") as sock:
        chunk = b" " * 2**16
        for _ in range(limit // len(chunk) + 1):  # one chunk past the limit; no last chunk: the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert read_response(sock) == (413, too_large)
    assert metric(client, 'gotr1_requests_total{outcome="invalid"}') == invalid + 2  # counted as malformed ones are
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerConfig(max_body_bytes=0)


def test_shutdown_answers_every_request_in_flight_with_503(tiny, monkeypatch):
    """Stopping the server with long requests in flight: uvicorn waited `timeout_graceful_shutdown`, then
    cancelled them (a plain request got uvicorn's bare-text 500, a stream ended without an `error` event) before
    the app's own shutdown ran, which counted them as failed. Now, as soon as shutdown begins, a running stream,
    a request queued in the engine and one whose body arrives afterwards each get a 503 "shutting down" answer
    (an `error` event for the stream), counted as shed by the shutdown, and every KV block returns."""
    srv, state = _start(tiny, EngineConfig(num_kv_blocks=512, block_size=16, max_num_seqs=2, num_scheduler_steps=1),
                        ServerConfig(max_n=1, max_queue=4))
    step = state.engine.step

    def slow_step(interrupt=None):  # 1900 steps take 19 s at least: far longer than the test, even unfixed
        time.sleep(0.01)
        return step(interrupt=interrupt)

    monkeypatch.setattr(state.engine, "step", slow_step)
    long = dict(prompt=PROMPTS[0], seed=1, max_reasoning_tokens=1900, min_reasoning_tokens=1900)
    late = json.dumps(dict(prompt=PROMPTS[1], max_reasoning_tokens=2)).encode()
    shutting_down = {"error": "the server is shutting down"}
    with srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client, ThreadPoolExecutor(2) as pool:
        with client.stream("POST", "/v1/generate", json={**long, "stream": True}) as stream:
            events = sse_events(stream.iter_lines())
            assert next(events)[0] == "token"  # running
            queued = pool.submit(client.post, "/v1/generate", json=long)  # max_num_seqs: waits for the stream
            assert wait_until(lambda: client.get("/health").json()["queue_depth"] == 1)
            # The stream's and the queued request's tasks only: a /health poll's task outlives its response a little,
            # and counting it made the wait below pass before the late request's headers arrived (its connection,
            # not yet a request when shutdown began, was then closed: a reset instead of a 503).
            assert wait_until(lambda: len(srv.server.server_state.tasks) == 2)
            with raw_post(client, f"Content-Length: {len(late)}\r\n", timeout_s=30) as sock:
                sock.sendall(late[:5])
                assert wait_until(lambda: len(srv.server.server_state.tasks) == 3)  # its handler awaits the body
                closing = pool.submit(srv.close)
                rest = list(events)
                assert rest[-1] == ("error", {**shutting_down, "status": 503})
                assert {k for k, _ in rest[:-1]} <= {"token"}
                r = queued.result(timeout=30)
                assert (r.status_code, r.json()) == (503, shutting_down)
                sock.sendall(late[5:])  # shutdown has begun: answered, not run
                assert read_response(sock) == (503, shutting_down)
            closing.result(timeout=30)
    outcomes = state.metrics.requests_total
    assert [outcomes.get(o) for o in ("shutdown", "failed", "cancelled", "completed")] == [3, 0, 0, 0]
    bm = state.engine.block_manager
    assert not state.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


# ------------------------------------------------------------------------------------------------ units
@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0, 200, allow_nan=False), max_size=40))
def test_histogram_buckets_are_cumulative_and_inclusive(values):
    h = Histogram("h", "test", buckets=(0.5, 1.0, 10.0))
    for v in values:
        h.observe(v)
    lines = dict(line.rsplit(" ", 1) for line in h.samples())
    for le in ("0.5", "1", "10"):
        assert int(lines[f'h_bucket{{le="{le}"}}']) == sum(v <= float(le) for v in values)
    assert int(lines['h_bucket{le="+Inf"}']) == int(lines["h_count"]) == len(values)
    assert math.isclose(float(lines["h_sum"]), sum(values), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_incremental_detokenizer_pieces_join_to_the_full_text(tiny, data):
    ids = data.draw(st.lists(st.integers(0, len(tiny.tokenizer) - 1), min_size=1, max_size=24))
    detok = IncrementalDetokenizer(tiny.decode_text)
    pieces = [detok.push(t, final=k == len(ids) - 1) for k, t in enumerate(ids)]
    assert "".join(pieces) == tiny.decode_text(ids)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_engine_progress_is_a_prefix_of_the_result(tiny):
    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=64, block_size=16))
    rid = engine.add_request(PROMPTS[0], SamplingParams(n=2, max_reasoning_tokens=6, seed=2, decode_images=False))
    seen, outs = [], []
    while engine.has_unfinished():
        seen.append(engine.progress(rid))
        outs += engine.step()
    assert seen[0] == [([], 0), ([], 0)]  # before the prefill
    for i, s in enumerate(outs[0].samples):
        for progress in seen:
            ids, images = progress[i]
            assert s.reasoning_ids[:len(ids)] == ids
            assert images == 0 or (ids == s.reasoning_ids and images <= len(s.image_tokens))
    with pytest.raises(KeyError):
        engine.progress(rid)


def test_adapter_is_loaded_and_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_preset("tiny", image_size=64).model,
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")
    served = build_preset("tiny", image_size=64)
    load_adapter(served, tmp_path / "adapter")
    ids = torch.tensor([served.encode_prompts([PROMPTS[0]], 4)[0]])
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        base = build_preset("tiny", image_size=64).model(input_ids=ids).logits
        got = served.model(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not hasattr(served.model, "peft_config")  # merged: plain Janus, no LoRA matmuls per step
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory"):
        load_adapter(served, tmp_path)


def test_cli_serve_parses_and_reports_a_bad_adapter(tmp_path, capsys, monkeypatch):
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--port", "0", "--max-queue", "3"])
    assert (args.host, args.port, args.max_queue, args.adapter) == ("127.0.0.1", 0, 3, None)
    # Serving despite the bad adapter fails here, instead of blocking on a real server on port 8000.
    monkeypatch.setattr("gotr1.serving.serve", lambda *a, **kw: pytest.fail("served with a bad adapter"))
    assert main(["serve", "--preset", "tiny", "--adapter", str(tmp_path)]) == 2
    assert "not a peft adapter directory" in capsys.readouterr().err


def test_request_defaults_follow_the_server_config(tiny, monkeypatch):
    """`gotr1 serve --preset shapes` answers with the preset's CFG weight and chain budget unless a request sets
    them; other presets keep GoT-R1's CFG 5."""
    from gotr1.serving import app

    body = app.request_model(ServerConfig(), tiny).model_validate({"prompt": "a cat"})
    assert body.cfg_weight == 5.0
    shaped = app.request_model(ServerConfig(default_cfg_weight=1.0, default_max_reasoning_tokens=96), tiny)
    assert (shaped.model_validate({"prompt": "a cat"}).cfg_weight, shaped.model_validate({"prompt": "a"})
            .max_reasoning_tokens) == (1.0, 96)
    assert shaped.model_validate({"prompt": "a cat", "cfg_weight": 3.0}).cfg_weight == 3.0
    with pytest.raises(ValueError, match="default_cfg_weight"):
        ServerConfig(default_cfg_weight=-1.0)
    seen = {}
    monkeypatch.setattr("gotr1.serving.serve", lambda bundle, **kw: seen.update(kw))
    assert main(["serve", "--preset", "shapes", "--port", "0"]) == 0
    assert (seen["config"].default_cfg_weight, seen["config"].default_max_reasoning_tokens) == (1.0, 96)
    assert seen["config"].interrupt_windows
    assert main(["serve", "--preset", "shapes", "--port", "0", "--no-interrupt-windows"]) == 0
    assert not seen["config"].interrupt_windows


@pytest.mark.parametrize("interrupt_windows", [True, False])
def test_a_command_arriving_mid_window_ends_the_window(tiny, interrupt_windows):
    """With a command in the inbox, the worker's next decode window runs one step (the new request's prefill
    waits for one step, not a window); without interrupts it runs whole. The tokens are the same either way."""
    params = SamplingParams(n=2, max_reasoning_tokens=6, min_reasoning_tokens=6, seed=3, decode_images=False)
    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16, num_scheduler_steps=16))
    worker = EngineWorker(engine, ServerMetrics(512), interrupt_windows=interrupt_windows)
    engine.add_request(PROMPTS[0], params, "a")
    worker._step()  # the prompt's prefill
    worker.inbox.put(("add", None))  # pending: not drained, only seen
    before = engine.num_steps
    worker._step()
    assert engine.num_steps - before == (1 if interrupt_windows else 6)  # the window: to the forced BOI
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    [want] = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16)).generate([PROMPTS[0]], params,
                                                                                        use_tqdm=False)
    for got, ref in zip(outputs[0].samples, want.samples):
        assert got.reasoning_ids == ref.reasoning_ids and torch.equal(got.image_tokens, ref.image_tokens)


BAD_SAMPLING = [
    ({"top_k": 10**20}, "top_k: Input should be less than"),  # overflowed int64 inside the engine step: 500s
    ({"cfg_weight": 1e300}, "cfg_weight: Input should be less than or equal to"),  # inf in float32: NaN logits
    ({"cfg_weight": 1e38}, "cfg_weight: Input should be less than or equal to"),  # finite, but w*(c-u) is not
    ({"text_temperature": 1e-40}, "text_temperature: Value error, must be 0 (greedy) or at least"),
    ({"image_temperature": 1e-30}, "image_temperature: Value error, must be 0 (greedy) or at least"),
    ({"text_temperature": 1e300}, "text_temperature: Input should be less than or equal to"),
]


@pytest.mark.parametrize("fields,message", BAD_SAMPLING, ids=[str(i) for i in range(len(BAD_SAMPLING))])
def test_sampling_values_the_engine_cannot_honour_get_422(main_server, fields, message):
    """Values the engine's float32/int64 settings cannot represent were accepted: a huge top_k failed every
    request batched with it (500), a huge CFG weight or a subnormal temperature sampled from NaN logits (200 with
    garbage tokens)."""
    client, _ = main_server
    r = client.post("/v1/generate", json={"prompt": "a", "max_reasoning_tokens": 2, **fields})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    ok = client.post("/v1/generate", json={"prompt": "a", "max_reasoning_tokens": 2, "return": ["tokens"],
                                           "text_temperature": 1e-3, "image_temperature": 1000.0,
                                           "cfg_weight": 1000.0, "top_k": 2**63 - 1})
    assert ok.status_code == 200, ok.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread re-raises
def test_engine_thread_death_answers_every_pending_request(tiny):
    """A bug that kills the engine thread must answer the requests it had not read yet, and any submitted after,
    instead of leaving their handlers awaiting admission forever."""
    import asyncio

    from gotr1.serving.worker import FailedEvent, Job

    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=64, block_size=16))
    worker = EngineWorker(engine, ServerMetrics(64))
    params = SamplingParams(n=1, max_reasoning_tokens=4, seed=0, decode_images=False)

    async def scenario():
        loop = asyncio.get_running_loop()
        first, during, after = (Job(name, PROMPTS[0], params, False, loop) for name in ("first", "during", "after"))

        def dying_progress(request_id):
            worker.submit(during)  # a request arrives while the engine thread steps
            raise RuntimeError("injected bug")

        engine.progress = dying_progress
        worker.start()
        worker.submit(first)
        await asyncio.wait_for(first.admitted, 10)
        event = await asyncio.wait_for(first.events.get(), 10)
        assert isinstance(event, FailedEvent) and "injected bug" in event.message
        with pytest.raises(RuntimeError, match=r"engine thread died: RuntimeError\('injected bug'\)"):
            await asyncio.wait_for(during.admitted, 10)
        await asyncio.to_thread(worker._thread.join, 10)
        assert not worker.alive
        worker.submit(after)
        with pytest.raises(RuntimeError, match="engine"):
            await asyncio.wait_for(after.admitted, 10)

    asyncio.run(scenario())


@pytest.mark.parametrize("body,status", [(b"[" * 100000, 400), (b'\xff\xfe{"prompt": "a"}', 400)])
def test_unparsable_bodies_get_the_servers_error_format(main_server, body, status):
    """JSON too deep for Python's parser or not UTF-8 failed inside FastAPI with `{"detail": ...}`, unlike every
    other refusal (`{"error": ...}`)."""
    client, _ = main_server
    r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and "error parsing the body" in r.json()["error"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread re-raises
def test_a_failed_step_whose_abort_also_fails_still_answers(tiny):
    """After a failed step the worker aborts the batch's requests; an abort that raises (the engine's state is
    broken) skipped answering them, so their handlers waited forever. Now they are answered and the thread stops
    (/health says so), instead of stepping a broken engine."""
    import asyncio

    from gotr1.serving.worker import FailedEvent, Job

    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=64, block_size=16))
    worker = EngineWorker(engine, ServerMetrics(64))
    params = SamplingParams(n=1, max_reasoning_tokens=4, seed=0, decode_images=False)

    def broken(*args, **kwargs):
        raise AssertionError("injected: block freed twice")

    def failing_step(interrupt=None):
        raise RuntimeError("injected step fault")

    engine.step, engine.abort = failing_step, broken

    async def scenario():
        job = Job("a", PROMPTS[0], params, False, asyncio.get_running_loop())
        worker.start()
        worker.submit(job)
        await asyncio.wait_for(job.admitted, 10)
        event = await asyncio.wait_for(job.events.get(), 10)
        assert isinstance(event, FailedEvent) and "injected step fault" in event.message
        await asyncio.to_thread(worker._thread.join, 10)
        assert not worker._thread.is_alive() and not worker.alive

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ output formats
def test_only_counters_end_in_total():
    """promtool's lint (`non-counter metrics should not have "_total" suffix`): the KV pool size, a gauge, was
    exposed as `gotr1_kv_blocks_total`, which reads as a counter to tools that go by the name."""
    families = dict(line.split()[2:4] for line in ServerMetrics(8).render().splitlines()
                    if line.startswith("# TYPE "))
    assert families["gotr1_kv_blocks_capacity"] == "gauge"
    assert {n: k for n, k in families.items() if n.endswith("_total") != (k == "counter")} == {}


def test_saved_artifacts_are_utf8_under_any_locale(tmp_path):
    """`save_groups` wrote the chain files in the locale's encoding: under a C/ASCII locale (no UTF-8 coercion)
    a chain naming `猫` failed the whole save. Also: an unparsable chain, zero objects, no image."""
    import os
    import subprocess
    import sys

    script = """if True:
        import sys
        from pathlib import Path
        from types import SimpleNamespace as S
        from PIL import Image
        from gotr1.artifacts import save_groups
        from gotr1.chain import parse_chain
        texts = ["un <|obj_start|>\\u732b \\U0001f431<|obj_end|> <|box_start|>(250,250),(750,750)<|box_end|> \\xe9",
                 "<|obj_start|>dog<|obj_end|> <|box_start|>(1,2)", "no objects\\nat all"]
        samples = [S(reasoning_text=t, chain=parse_chain(t), image=Image.new("RGB", (64, 64)) if i != 2 else None)
                   for i, t in enumerate(texts)]
        print(save_groups(Path(sys.argv[1]), [S(prompt="chat \\xfc", samples=samples)]))
    """  # ASCII: a C locale cannot decode a non-ASCII command line
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p000_s00.png", "p000_s00_chain.txt", "p000_s00_layout.png", "p000_s01.png", "p000_s01_chain.txt",
        "p000_s01_layout.png", "p000_s02_chain.txt", "samples.jsonl"]
    chain = (tmp_path / "p000_s00_chain.txt").read_bytes().decode("utf-8")
    assert chain == "un <|obj_start|>猫 🐱<|obj_end|> <|box_start|>(250,250),(750,750)<|box_end|> é\n"
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["objects"] for r in records] == [[{"name": "猫 🐱", "box": [250, 250, 750, 750]}], [], []]
    assert records[0]["prompt"] == "chat ü" and records[0]["problems"] == [] and records[2]["problems"] == []
    assert records[1]["problems"] and records[1]["layout"] == "p000_s01_layout.png"
    assert "image" not in records[2] and (tmp_path / "p000_s02_chain.txt").read_text("utf-8") == "no objects\nat all\n"
    layout = np.asarray(Image.open(tmp_path / "p000_s00_layout.png").convert("RGB"))
    assert layout.shape == (256, 512, 3)  # 64 px enlarged 4x | the layout alone
    red = (230, 25, 75)  # the first object's colour, on the box's left edge at x = 250/1000 * 256 = 64
    assert tuple(layout[128, 64]) == red and tuple(layout[128, 256 + 64]) == red
    empty = np.asarray(Image.open(tmp_path / "p000_s01_layout.png").convert("RGB"))
    assert (empty[:, 256:] == 255).all()  # no object: a blank layout beside the image


def test_image_decoding_failure_is_an_error_response_or_event(main_server, monkeypatch):
    """The decoder thread failing (a GPU out of memory, say) closed a stream mid-way with no `error` event and
    answered a plain request with a bare-text 500; a request without images records no time to image. Either
    way the request counts as failed (it counted as completed once its tokens were done)."""
    client, state = main_server

    def broken(output, returns):
        raise RuntimeError("injected decoder fault")

    def outcomes():
        return {o: metric(client, f'gotr1_requests_total{{outcome="{o}"}}') for o in ("completed", "failed")}

    monkeypatch.setattr(state, "_images", broken)
    before = outcomes()
    body = dict(prompt=PROMPTS[0], max_reasoning_tokens=2, seed=3)
    r = client.post("/v1/generate", json={**body, "return": ["image"]})
    assert r.status_code == 500 and "image decoding failed" in r.json()["error"]
    with client.stream("POST", "/v1/generate", json={**body, "return": ["image"], "stream": True}) as s:
        events = list(sse_events(s.iter_lines()))
    assert events[-1][0] == "error" and "injected decoder fault" in events[-1][1]["error"]
    assert events[-1][1]["status"] == 500  # what the plain request was answered with
    assert {o: v - before[o] for o, v in outcomes().items()} == {"completed": 0, "failed": 2}
    images_before = metric(client, "gotr1_time_to_image_seconds_count")
    assert client.post("/v1/generate", json={**body, "return": ["tokens"]}).status_code == 200
    assert metric(client, "gotr1_time_to_image_seconds_count") == images_before
    monkeypatch.undo()
    assert client.post("/v1/generate", json={**body, "return": ["image"]}).status_code == 200


# ------------------------------------------------------------------------------------------------ decoder thread
def test_a_client_gone_before_its_decode_runs_is_not_decoded(main_server, monkeypatch):
    """A plain request whose client left after its last token still had its images decoded on the one decoder
    thread, delaying every later request's images; its slot was free meanwhile, so a burst of such clients
    queued decodes without bound. Now a decode whose client is gone by its turn is skipped, and the request
    counts as cancelled (it was counted completed when its tokens were done, though never answered)."""
    import threading

    client, state = main_server
    gate, calls, images = threading.Event(), [], state._images

    def gated(output, returns):
        calls.append(output.request_id)
        assert gate.wait(30)
        return images(output, returns)

    monkeypatch.setattr(state, "_images", gated)
    decoded = metric(client, "gotr1_time_to_image_seconds_count")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/generate", json=dict(prompt=PROMPTS[0], max_reasoning_tokens=2))
        assert wait_until(lambda: len(calls) == 1)  # the first request holds the decoder
        outcomes = {o: metric(client, f'gotr1_requests_total{{outcome="{o}"}}') for o in ("completed", "cancelled")}
        tokens_done = metric(client, "gotr1_time_to_first_token_seconds_count")  # observed as a request's tokens end
        body = json.dumps(dict(prompt=PROMPTS[1], max_reasoning_tokens=2)).encode()
        with socket.create_connection((client.base_url.host, client.base_url.port), timeout=30) as gone:
            gone.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_until(lambda: metric(client, "gotr1_time_to_first_token_seconds_count") == tokens_done + 1)
        assert wait_until(lambda: client.get("/health").json()["in_flight"] == 1)  # only the first holds a slot
        gate.set()
        assert first.result(timeout=60).status_code == 200
    assert {o: metric(client, f'gotr1_requests_total{{outcome="{o}"}}') - v for o, v in outcomes.items()} == {
        "completed": 1, "cancelled": 1}
    assert wait_until(lambda: client.get("/health").json()["in_flight"] == 0)
    time.sleep(0.2)  # the decoder thread would take the second decode now
    assert len(calls) == 1 and metric(client, "gotr1_time_to_image_seconds_count") == decoded + 1


# ------------------------------------------------------------------------------------------------ mutation review
def test_request_model_bounds_are_exact(tiny):
    """Each bound of the request model at its edge: the edge value is accepted, one past it refused. The reasoning
    budget is capped where BOS, `<begin_of_image>` and the image tokens still fit the model's positions."""
    from pydantic import ValidationError

    from engine.sampling_params import MAX_CFG_WEIGHT, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE
    from gotr1.serving.app import request_model

    limit = tiny.max_positions - 2 - tiny.num_image_tokens
    body = request_model(ServerConfig(max_n=4), tiny)
    edges = dict(prompt="x" * 2000, n=4, seed=2**63 - 1, cfg_weight=MAX_CFG_WEIGHT, text_temperature=MIN_TEMPERATURE,
                 image_temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, top_p=1.0, max_reasoning_tokens=limit,
                 min_reasoning_tokens=0)
    assert body.model_validate(edges).model_dump(exclude={"returns", "stream"}) == edges
    for field, value, message in [("seed", 2**63, "less than 9223372036854775808"),
                                  ("max_reasoning_tokens", limit + 1, f"less than or equal to {limit}"),
                                  ("min_reasoning_tokens", -1, "greater than or equal to 0"),
                                  ("image_temperature", MAX_TEMPERATURE * 1.01, "less than or equal to"),
                                  ("text_temperature", MAX_TEMPERATURE * 1.01, "less than or equal to")]:
        with pytest.raises(ValidationError, match=message) as e:
            body.model_validate({**edges, field: value})
        assert [err["loc"] for err in e.value.errors()] == [(field,)]
    # A default budget over what the model holds is capped to it, not left to fail every request that omits it.
    capped = request_model(ServerConfig(default_max_reasoning_tokens=10**6), tiny)
    assert capped.model_validate({"prompt": "a"}).max_reasoning_tokens == limit
    assert ServerConfig(default_max_reasoning_tokens=0, default_cfg_weight=0.0).default_cfg_weight == 0.0
    assert ServerConfig(default_cfg_weight=MAX_CFG_WEIGHT).default_cfg_weight == MAX_CFG_WEIGHT
    for bad in (dict(default_cfg_weight=MAX_CFG_WEIGHT * 1.01), dict(default_max_reasoning_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad)


def test_error_bodies_name_each_field_and_carry_the_details(main_server):
    """The 422 body: every failing field as `field: message` joined by "; " (without pydantic's `body.` prefix),
    and the structured list under `detail`; a refusal by FastAPI or the body limit, on any route, in the same
    `{"error"}` format with its headers (a 405 names the allowed method)."""
    client, _ = main_server
    r = client.post("/v1/generate", json={"prompt": "a", "n": 5, "top_p": 0})
    assert r.status_code == 422
    assert r.json() == {"error": "n: Input should be less than or equal to 4; top_p: Input should be greater than 0",
                        "detail": [{"loc": ["body", "n"], "msg": "Input should be less than or equal to 4",
                                    "type": "less_than_equal"},
                                   {"loc": ["body", "top_p"], "msg": "Input should be greater than 0",
                                    "type": "greater_than"}]}
    invalid = metric(client, 'gotr1_requests_total{outcome="invalid"}')
    r = client.post("/v1/generate", content=b"[" * 100000, headers={"content-type": "application/json"})
    assert r.status_code == 400  # FastAPI's own refusal, counted as invalid as a malformed body is
    assert metric(client, 'gotr1_requests_total{outcome="invalid"}') == invalid + 1
    r = client.get("/v1/generate")
    assert (r.status_code, r.json(), r.headers["allow"]) == (405, {"error": "Method Not Allowed"}, "POST")
    assert metric(client, 'gotr1_requests_total{outcome="invalid"}') == invalid + 1


def test_a_seedless_request_reports_the_seed_it_ran_with(tiny, main_server):
    """A request without a seed draws its own, different per request, and reports the one the engine used:
    the offline engine given the reported seed makes the same tokens (in the body, and the stream's `X-Seed`)."""
    client, _ = main_server
    body = dict(prompt=PROMPTS[2], n=2, max_reasoning_tokens=5)
    a, b = (client.post("/v1/generate", json={**body, "return": ["tokens"]}).json() for _ in range(2))
    with client.stream("POST", "/v1/generate", json={**body, "return": ["tokens"], "stream": True}) as r:
        seed, request_id = int(r.headers["x-seed"]), r.headers["x-request-id"]
        done = [d for k, d in sse_events(r.iter_lines()) if k == "done"][0]
    assert len({a["seed"], b["seed"], seed}) == 3 and (done["seed"], done["id"]) == (seed, request_id)
    engine = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16))
    for got in (a, b, done):
        [want] = engine.generate([body["prompt"]], params_of({**body, "seed": got["seed"]}, decode_images=False),
                                 use_tqdm=False)
        assert [(s["reasoning_ids"], s["image_tokens"]) for s in got["samples"]] == [
            (w.reasoning_ids, w.image_tokens.tolist()) for w in want.samples]


def test_layout_alone_is_decoded_and_drawn(tiny, main_server):
    """`"return": ["layout"]` needs the decoded image as much as `"image"` does."""
    from gotr1.chain import layout_overlay

    client, _ = main_server
    body = dict(prompt=PROMPTS[3], seed=11, max_reasoning_tokens=4)
    r = client.post("/v1/generate", json={**body, "return": ["layout"]})
    assert r.status_code == 200, r.text
    [sample] = r.json()["samples"]
    [want] = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16)).generate([body["prompt"]],
                                                                                      params_of(body), use_tqdm=False)
    assert set(sample) == {"index", "layout"}
    w = want.samples[0]
    np.testing.assert_array_equal(png_array(sample["layout"]),
                                  np.asarray(layout_overlay(w.image, w.chain.objects).convert("RGB")))


def test_metrics_count_each_finished_request(main_server):
    """One request's effect on the counters and histograms: its tokens (reasoning + image), one time to first
    token and one time to image, the engine's forwards (the engine's own count) with one duration per step()
    call, and a tokens/s gauge that includes it."""
    client, state = main_server
    names = ["gotr1_generated_tokens_total", "gotr1_time_to_first_token_seconds_count",
             "gotr1_time_to_image_seconds_count", 'gotr1_requests_total{outcome="completed"}',
             "gotr1_engine_steps_total", "gotr1_engine_step_seconds_count"]
    before, forwards = {n: metric(client, n) for n in names}, state.engine.num_steps
    calls = state.metrics.step_seconds.count
    r = client.post("/v1/generate", json=dict(prompt=PROMPTS[0], n=2, seed=5, max_reasoning_tokens=3,
                                              **{"return": ["tokens", "image"]}))
    assert r.status_code == 200, r.text
    tokens = sum(len(s["reasoning_ids"]) + len(s["image_tokens"]) for s in r.json()["samples"])
    delta = {n: metric(client, n) - before[n] for n in names}
    forwards = state.engine.num_steps - forwards
    assert forwards >= 1 + 3 + 16  # prefill, the rest of the chain to <begin_of_image>, one per image token
    assert delta == {"gotr1_generated_tokens_total": tokens, "gotr1_time_to_first_token_seconds_count": 1,
                     "gotr1_time_to_image_seconds_count": 1, 'gotr1_requests_total{outcome="completed"}': 1,
                     "gotr1_engine_steps_total": forwards,
                     "gotr1_engine_step_seconds_count": state.metrics.step_seconds.count - calls}
    assert 0 < delta["gotr1_engine_step_seconds_count"] <= forwards
    assert metric(client, "gotr1_tokens_per_second") >= tokens / 10  # a 10 s window that holds this request


def test_time_to_image_includes_the_decode(main_server, monkeypatch):
    client, state = main_server
    images = state._images

    def slow(output, returns):
        time.sleep(0.3)  # a decode that takes 0.3 s at least
        return images(output, returns)

    monkeypatch.setattr(state, "_images", slow)
    total = metric(client, "gotr1_time_to_image_seconds_sum")
    t = client.post("/v1/generate", json=dict(prompt=PROMPTS[0], seed=1, max_reasoning_tokens=2)).json()["timing"]
    assert t["time_to_image_s"] - t["time_to_last_token_s"] >= 0.3
    assert math.isclose(metric(client, "gotr1_time_to_image_seconds_sum") - total, t["time_to_image_s"],
                        rel_tol=1e-6)


def test_gauges_follow_a_request_through_the_engine(main_server):
    """While a stream decodes: one running group, none queued, one request in flight, its KV blocks used; the
    same on /health and /metrics. After it is closed: nothing in flight, every block free."""
    client, _ = main_server

    def gauges():  # from one scrape: the engine thread moves on between two
        values = dict(line.split() for line in client.get("/metrics").text.splitlines() if line.startswith("gotr1_"))
        return {n: float(values[f"gotr1_{n}"]) for n in ("queue_depth", "running_groups", "requests_in_flight",
                                                          "kv_blocks_used", "kv_blocks_free", "kv_blocks_capacity")}

    long = dict(prompt=PROMPTS[0], seed=1, max_reasoning_tokens=1500, min_reasoning_tokens=1500, stream=True)
    with client.stream("POST", "/v1/generate", json=long) as stream:
        events = sse_events(stream.iter_lines())
        assert next(events)[0] == "token"
        health, g = client.get("/health").json(), gauges()
        assert (health["queue_depth"], health["running_groups"], health["in_flight"]) == (0, 1, 1)
        assert (g["queue_depth"], g["running_groups"], g["requests_in_flight"], g["kv_blocks_capacity"]) == (
            0, 1, 1, 512)
        assert g["kv_blocks_used"] > 0 and g["kv_blocks_used"] + g["kv_blocks_free"] == 512
    assert wait_until(lambda: gauges() == {"queue_depth": 0, "running_groups": 0, "requests_in_flight": 0,
                                           "kv_blocks_used": 0, "kv_blocks_free": 512, "kv_blocks_capacity": 512})


def test_the_app_under_any_asgi_server(tiny):
    """`create_app` as a plain ASGI app (httpx's transport, no `_Server`): before its lifespan runs, /health and
    requests get 503 (not a request awaiting an engine thread that never started); under it requests run; leaving
    it stops the engine thread and waits for it. A request whose submission races the shutdown is shed: 503,
    counted as such."""
    import asyncio

    body = dict(prompt=PROMPTS[0], seed=2, max_reasoning_tokens=2, **{"return": ["tokens"]})
    shutting_down = (503, {"error": "the server is shutting down"})

    def new_app():
        return create_app(tiny, EngineConfig(num_kv_blocks=64, block_size=16), ServerConfig(max_n=2, max_queue=2))

    async def post(client):
        r = await asyncio.wait_for(client.post("/v1/generate", json=body), 30)
        return r.status_code, r.json()

    async def lifespan(app):
        server = app.state.server
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            r = await client.get("/health")
            assert (r.status_code, r.json()["status"]) == (503, "engine stopped")
            assert await post(client) == (503, {"error": "the engine is not running"})
            shut_down = server.worker._shut_down
            server.worker._shut_down = lambda commands: (time.sleep(0.2), shut_down(commands))  # a slow exit
            async with app.router.lifespan_context(app):
                assert (await client.get("/health")).json()["status"] == "ok"
                assert (await post(client))[0] == 200
            assert not server.worker._thread.is_alive()
            assert await post(client) == shutting_down

    async def racing_shutdown(app):
        server = app.state.server
        submit = server.worker.submit

        def racing(job):  # shutdown begins between the handler's checks and the submission
            server.shut_down()
            submit(job)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            async with app.router.lifespan_context(app):
                server.worker.submit = racing
                assert await post(client) == shutting_down

    for scenario in (lifespan, racing_shutdown):
        app = new_app()
        asyncio.run(scenario(app))
        outcomes = app.state.server.metrics.requests_total
        assert [outcomes.get(o) for o in ("shutdown", "failed", "completed")] == [1, 0, int(scenario is lifespan)]


def test_worker_late_abort_and_adds_beside_the_stop(tiny):
    """At the engine thread: an abort arriving after its request finished (a client leaving just after its last
    token) is a no-op, not a crash or a `cancelled` event (the handlers count outcomes, not this thread); the
    gauges are published before the events (a finished request's blocks show free when its answer arrives); an
    add read together with the stop command is refused as shutting down, answered once (no second answer raising
    inside the event loop)."""
    import asyncio

    from gotr1.serving.worker import SHUTTING_DOWN, FinishedEvent, Job

    params = SamplingParams(n=1, max_reasoning_tokens=3, seed=0, decode_images=False)

    async def finish(worker, job):
        worker.submit(job)
        await asyncio.wait_for(job.admitted, 10)
        return await asyncio.wait_for(job.events.get(), 30)

    async def scenario():
        loop, errors = asyncio.get_running_loop(), []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        metrics = ServerMetrics(64)
        worker = EngineWorker(LLMEngine(tiny, EngineConfig(num_kv_blocks=64, block_size=16)), metrics)
        worker.start()
        first, second = (Job(name, PROMPTS[0], params, False, loop) for name in ("first", "second"))
        free_when_posted = []
        post = first.post
        first.post = lambda event: (free_when_posted.append(metrics.kv_blocks_free.get()), post(event))
        assert isinstance(await finish(worker, first), FinishedEvent) and free_when_posted == [64]
        worker.cancel(first)
        assert isinstance(await finish(worker, second), FinishedEvent) and worker.alive
        assert first.events.empty() and metrics.requests_total.samples() == []
        worker.stop()
        await asyncio.to_thread(worker.join, 10)

        stopped = EngineWorker(worker.engine, metrics)
        pending = Job("pending", PROMPTS[0], params, False, loop)
        stopped.submit(pending)
        stopped.stop()
        stopped.start()  # reads the add and the stop together
        with pytest.raises(RuntimeError, match=SHUTTING_DOWN):
            await asyncio.wait_for(pending.admitted, 10)
        await asyncio.to_thread(stopped.join, 10)
        await asyncio.sleep(0)  # let any callback the thread scheduled last run
        assert errors == [] and not stopped.engine.has_unfinished()

    asyncio.run(scenario())


def test_metric_units():
    """Histogram bucket edges are inclusive (`le`); the tokens/s rate is a 10 s window's sum over 10 s;
    counters refuse to go down; label values are escaped; bucket lists must increase."""
    from gotr1.serving.metrics import Counter, Rate

    h = Histogram("h", "test", buckets=(0.5, 1.0, 10.0))
    for v in (0.5, 1.0, 10.0, 10.5):
        h.observe(v)
    assert h.samples() == ['h_bucket{le="0.5"} 1', 'h_bucket{le="1"} 2', 'h_bucket{le="10"} 3',
                           'h_bucket{le="+Inf"} 4', "h_sum 22", "h_count 4"]
    rate = Rate(10.0)
    rate.add(30, now=100.0)
    rate.add(50, now=105.0)
    assert (rate.per_second(now=105.0), rate.per_second(now=110.0), rate.per_second(now=112.0),
            rate.per_second(now=116.0)) == (8.0, 8.0, 5.0, 0.0)
    c = Counter("c_total", "test", label="l")
    c.inc(2, label_value='a"b\\c\nd')
    assert c.samples() == ['c_total{l="a\\"b\\\\c\\nd"} 2']
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("h", "test", buckets=(1.0, 0.5))
    lines = ServerMetrics(8).render().splitlines()  # before any request: a 0, not a missing series
    assert {"gotr1_requests_in_flight 0", "gotr1_engine_steps_total 0", "gotr1_kv_blocks_capacity 8"} <= set(lines)


def test_cli_serve_passes_every_flag_on(monkeypatch):
    seen = {}
    monkeypatch.setattr("gotr1.serving.serve", lambda bundle, **kw: seen.update(kw, bundle=bundle))
    assert main(["serve", "--preset", "tiny", "--host", "0.0.0.0", "--port", "65535",
                 "--max-n", "3", "--max-queue", "5", "--max-body-bytes", "999", "--num-kv-blocks", "40",
                 "--block-size", "32", "--num-scheduler-steps", "4", "--num-image-scheduler-steps", "64"]) == 0
    config, engine_config = seen["config"], seen["engine_config"]
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 65535)
    assert (config.max_n, config.max_queue, config.max_body_bytes) == (3, 5, 999)
    assert (engine_config.num_kv_blocks, engine_config.block_size, engine_config.num_scheduler_steps,
            engine_config.num_image_scheduler_steps) == (40, 32, 4, 64)
    assert seen["bundle"].model.dtype == torch.float32  # no GPU here: float32 unless --dtype says otherwise
    assert main(["serve", "--preset", "tiny"]) == 0
    defaults = ServerConfig()
    assert (seen["config"].max_n, seen["config"].max_queue, seen["config"].max_body_bytes) == (
        defaults.max_n, defaults.max_queue, defaults.max_body_bytes)


def test_stream_state_sends_tokens_then_the_parsed_boxes(tiny):
    """A chain with an object, streamed in two parts (the second as the finished output's catch-up): the `token`
    ids and texts rebuild it, one `boxes` event parses the whole chain at `<begin_of_image>`, a sample that got
    nothing sends nothing, and a token after `<begin_of_image>` is refused."""
    from types import SimpleNamespace

    from gotr1.serving.responses import StreamState

    text = "猫 café: <|obj_start|>cat<|obj_end|> <|box_start|>(100,200),(300,400)<|box_end|>"
    ids = [*tiny.tokenizer.encode(text, add_special_tokens=False), tiny.boi_id]
    state = StreamState(tiny, 2)
    events = list(sse_events(state.tokens([(1, ids[:2])]).splitlines()))
    output = SimpleNamespace(samples=[SimpleNamespace(reasoning_ids=[]), SimpleNamespace(reasoning_ids=ids)])
    events += sse_events(state.catch_up(output).splitlines())
    assert [k for k, _ in events] == ["token"] * len(ids) + ["boxes"] and {d["sample"] for _, d in events} == {1}
    assert [d["id"] for _, d in events[:-1]] == ids and "".join(d["text"] for _, d in events[:-1]) == text
    assert events[-1][1] == {"sample": 1, "chain": text, "boxes": [{"name": "cat", "box": [100, 200, 300, 400]}],
                             "problems": []}
    assert state.catch_up(output) == ""
    with pytest.raises(RuntimeError, match="after its <begin_of_image>"):
        state.tokens([(1, ids[:1])])


def test_a_stream_catches_up_on_ids_its_progress_did_not_show(tiny, main_server, monkeypatch):
    """The engine thread streams what `progress` shows after each step; ids only the finished output holds (a
    progress lagging one id behind here, `<begin_of_image>` included) are sent from it before `done`, once each."""
    client, state = main_server
    progress = state.engine.progress
    monkeypatch.setattr(state.engine, "progress", lambda rid: [(ids[:-1], n) for ids, n in progress(rid)])
    body = dict(prompt=PROMPTS[1], n=2, seed=9, max_reasoning_tokens=5)
    with client.stream("POST", "/v1/generate", json={**body, "stream": True, "return": ["chain"]}) as r:
        events = list(sse_events(r.iter_lines()))
    [want] = LLMEngine(tiny, EngineConfig(num_kv_blocks=512, block_size=16)).generate(
        [body["prompt"]], params_of(body, decode_images=False), use_tqdm=False)
    assert events[-1][0] == "done"
    for i, w in enumerate(want.samples):
        mine = [(k, d) for k, d in events if d.get("sample") == i]
        assert [d["id"] for k, d in mine if k == "token"] == w.reasoning_ids
        assert mine[-1] == ("boxes", {"sample": i, "chain": w.reasoning_text, "problems": w.chain.problems,
                                      "boxes": [{"name": o.name, "box": list(o.box)} for o in w.chain.objects]})


def test_a_client_leaving_ends_its_handler(tiny):
    """A request its client abandoned is answered inside the server too: its handler, plain or streaming, returns
    instead of awaiting events forever (a task leaked per client that gave up). Also: `interrupt_windows=False`
    reaches the engine thread."""
    srv, state = _start(tiny, EngineConfig(num_kv_blocks=512, block_size=16),
                        ServerConfig(max_n=1, max_queue=4, interrupt_windows=False))
    assert state.worker.interrupt_windows is False
    long = dict(prompt=PROMPTS[1], seed=3, max_reasoning_tokens=1500, min_reasoning_tokens=1500)
    with srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        tasks = srv.server.server_state.tasks
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/generate", json=long, timeout=httpx.Timeout(60.0, read=0.2))
        with client.stream("POST", "/v1/generate", json={**long, "stream": True}) as stream:
            assert next(sse_events(stream.iter_lines()))[0] == "token"
        assert wait_until(lambda: state.metrics.requests_total.get("cancelled") == 2)
        assert wait_until(lambda: not tasks)
        assert state.in_flight == 0


# ------------------------------------------------------------------------------------------------ outcome accounting
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread re-raises
def test_every_generate_answer_counts_once_under_its_outcome(tiny, monkeypatch):
    """Each answer to `POST /v1/generate` adds exactly 1 to `gotr1_requests_total`, under a label its help text
    documents, once the handler is done (no late count from the engine thread). Were counted wrong: a failed
    image decode (as completed, when its tokens were done), the 503s of a dead engine thread, before the request
    reached it or while it was dying (not at all)."""
    import re
    import threading

    srv, state = _start(tiny, EngineConfig(num_kv_blocks=512, block_size=16), ServerConfig(max_n=1, max_queue=2))
    tasks = srv.server.server_state.tasks  # the request handlers running
    short = dict(prompt=PROMPTS[0], seed=1, max_reasoning_tokens=2)
    long = dict(prompt=PROMPTS[1], seed=2, max_reasoning_tokens=1500, min_reasoning_tokens=1500)
    seen = set()

    def outcomes():
        text = "\n".join(state.metrics.requests_total.samples())
        return {m[1]: float(m[2]) for m in re.finditer(r'outcome="(\w+)"\} (\S+)', text)}

    def counted(want, send, held=0):
        """`send()`, whose requests (their handlers finished, `held` others still running) add `want`."""
        before = outcomes()
        result = send()
        assert wait_until(lambda: sum(outcomes().values()) >= sum(before.values()) + sum(want.values())
                          and len(tasks) <= held)
        after = outcomes()
        assert {o: v - before.get(o, 0) for o, v in after.items() if v != before.get(o, 0)} == want
        seen.update(want)
        return result

    with srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        def post(body, **kwargs):
            return client.post("/v1/generate", json=body, **kwargs)

        def stream(body):
            with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                return r.status_code, list(sse_events(r.iter_lines()))

        assert counted({"completed": 1}, lambda: post(short)).status_code == 200
        status, events = counted({"completed": 1}, lambda: stream(short))
        assert status == 200 and events[-1][0] == "done"

        assert counted({"invalid": 1}, lambda: post({"prompt": ""})).status_code == 422
        refused = counted({"invalid": 1}, lambda: post({**short, "prompt": "a " * 900, "max_reasoning_tokens": 1200}))
        assert refused.status_code == 422 and "too long" in refused.json()["error"]  # by the engine, at admission
        not_json = counted({"invalid": 1}, lambda: client.post("/v1/generate", content=b'{"prompt": "a",',
                                                               headers={"content-type": "application/json"}))
        assert not_json.status_code == 400

        def too_large():
            with raw_post(client, f"Content-Length: {state.config.max_body_bytes + 1}\r\n") as sock:
                return read_response(sock)[0]

        assert counted({"invalid": 1}, too_large) == 413

        def broken_decode(output, returns):
            raise RuntimeError("injected decoder fault")

        def broken_step(interrupt=None):
            raise RuntimeError("injected step fault")

        with monkeypatch.context() as m:
            m.setattr(state, "_images", broken_decode)
            assert counted({"failed": 1}, lambda: post(short)).status_code == 500
            status, events = counted({"failed": 1}, lambda: stream(short))
            assert status == 200 and events[-1][0] == "error" and "injected decoder fault" in events[-1][1]["error"]
            assert events[-1][1]["status"] == 500
            m.setattr(state.engine, "step", broken_step)
            assert counted({"failed": 1}, lambda: post(short)).status_code == 500

        def broken_response(*args, **kwargs):
            raise RuntimeError("injected bug")

        def stream_breaks_off():
            with pytest.raises(httpx.RemoteProtocolError):
                stream(short)

        with monkeypatch.context() as m:  # a bug in a handler: Starlette's bare 500, a stream cut off
            m.setattr("gotr1.serving.app.response_json", broken_response)
            assert counted({"failed": 1}, lambda: post(short)).status_code == 500
            counted({"failed": 1}, stream_breaks_off)

        def gives_up():
            with pytest.raises(httpx.ReadTimeout):
                post(long, timeout=httpx.Timeout(60.0, read=0.2))

        counted({"cancelled": 1}, gives_up)

        def leaves_mid_stream():
            with client.stream("POST", "/v1/generate", json={**long, "stream": True}) as r:
                events = sse_events(r.iter_lines())  # held: a dropped line iterator closes the connection
                assert next(events)[0] == "token"
                with monkeypatch.context() as m:
                    m.setattr(state.config, "max_queue", 1)
                    assert counted({"queue_full": 1}, lambda: post(short), held=1).status_code == 429

        counted({"queue_full": 1, "cancelled": 1}, leaves_mid_stream)  # the 429 inside, then the stream

        # The engine thread dies while one request runs and another waits in its inbox: the first fails (500), the
        # second is refused at admission (503); from then on requests get 503 before reaching the thread.
        stepping, die = threading.Event(), threading.Event()

        def dying_progress(request_id):
            stepping.set()
            assert die.wait(30)
            raise RuntimeError("injected bug")

        assert wait_until(lambda: state.metrics.kv_blocks_used.get() == 0)  # the stream's abort is done
        monkeypatch.setattr(state.engine, "progress", dying_progress)

        def engine_dies():
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(post, short)
                assert stepping.wait(30)
                waiting = pool.submit(post, short)
                assert wait_until(lambda: state.in_flight == 2)  # submitted: the lease is taken just before
                die.set()
                return running.result(timeout=30), waiting.result(timeout=30)

        running, waiting = counted({"failed": 1, "unavailable": 1}, engine_dies)
        assert running.status_code == 500 and "engine thread died" in running.json()["error"]
        assert waiting.status_code == 503 and "engine thread died" in waiting.json()["error"]
        dead = counted({"unavailable": 1}, lambda: post(short))
        assert (dead.status_code, dead.json()) == (503, {"error": "the engine is not running"})

        state.shut_down()  # as `_Server` does when shutdown begins
        shed = counted({"shutdown": 1}, lambda: post(short))
        assert (shed.status_code, shed.json()) == (503, {"error": "the server is shutting down"})

    labels = {"completed", "cancelled", "failed", "invalid", "queue_full", "shutdown", "unavailable"}
    assert seen == labels and all(label in state.metrics.requests_total.help for label in labels)


def test_the_startup_heap_is_frozen_while_serving(tiny):
    """The garbage collector skips the engine, model and app while the server runs (a full collection over them
    paused the whole process for 250 ms, a request's time to first token in the open-loop benchmark), and takes
    them back when it stops."""
    app = create_app(tiny, EngineConfig(num_kv_blocks=64, block_size=16), ServerConfig(max_n=1))
    state = app.state.server

    def tracked(obj) -> bool:  # the permanent generation is not listed
        return any(o is obj for o in gc.get_objects())

    assert tracked(state.engine) and tracked(state.metrics)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        assert not tracked(state.engine) and not tracked(state.metrics) and not tracked(tiny.model)
        assert client.post("/v1/generate", json={"prompt": "a red circle", "n": 1, "max_reasoning_tokens": 2}
                           ).status_code == 200
    assert tracked(state.engine) and tracked(state.metrics)
