"""`phi3-jax serve` as a subprocess on a free localhost port, driven by the official `openai`
client (and raw httpx for what that client never sends): a random transformers checkpoint with
a Phi-3 tokenizer (results against `model.generate` in this process) and the embedded model
(load, disconnects). Two servers per module, shared by the tests; the last test stops one with
SIGTERM under load. A device fault is injected in-process (no fault hook in the server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

# Small engine shapes: 15 programs to build (9 with --no-bucket-rows).
SHAPES = ["--max-slots", "8", "--max-len", "64", "--prefill-chunk", "32", "--decode-steps", "4",
          "--buckets-per-octave", "1"]
KEY = "test-key"
PROMPTS = ["The quick brown fox", "Hello world, this is a", "a b c d e f g"]
IDS_PROMPT = [5, 17, 42, 99, 300, 7]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`phi3-jax serve` in a subprocess; stderr goes to a file (read on failure)."""

    def __init__(self, tmp, name: str, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("XLA_FLAGS", None)  # one device is enough
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phi3_jax.cli", "serve", "--port", str(self.port), *SHAPES,
             "--compilation-cache", str(tmp.parent / "jax-cache"), *args],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env=env)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = [line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#")]
        return {name: float(value) for name, value in samples}

    def client(self, *, key: str | None = KEY, async_: bool = False):
        kind = openai.AsyncOpenAI if async_ else openai.OpenAI
        return kind(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0,
                    timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(text_model, tmp_path_factory):
    """Both servers, started together (their warm-ups overlap)."""
    tmp = tmp_path_factory.mktemp("serve")
    random_ = Server(tmp, "random", "--model", str(text_model.path), "--api-key", KEY,
                     "--served-model-name", "tiny", "--grace", "2")
    embedded = Server(tmp, "embedded", "--no-bucket-rows")  # full-width decode calls
    try:
        random_.wait_ready()
        embedded.wait_ready()
        yield random_, embedded
    finally:
        random_.stop()
        embedded.stop()


@pytest.fixture(scope="module")
def rnd(servers):
    return servers[0]


@pytest.fixture(scope="module")
def emb(servers):
    return servers[1]


@pytest.fixture(scope="module")
def reference(text_model):
    """model.generate in this process: greedy, 8 new tokens, logprobs and prompt logprobs."""
    prompts = [*PROMPTS, IDS_PROMPT, CHAT]
    done = text_model.generate(prompts, max_new_tokens=8, logprobs=2, prompt_logprobs=2)
    return dict(zip(["p0", "p1", "p2", "ids", "chat"], done, strict=True))


def _close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=0, atol=1e-5)


# ---- results against model.generate ----------------------------------------------------------

def test_completions_equal_generate(rnd, reference, text_model):
    client = rnd.client()
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):
        ref = reference[f"p{i}"]
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == sum(len(text_model.tokenizer.encode(p)) for p in PROMPTS)
    assert out.usage.completion_tokens == sum(len(reference[f"p{i}"].token_ids) for i in range(3))
    ids = client.completions.create(model="tiny", prompt=IDS_PROMPT, max_tokens=8)
    assert ids.choices[0].text == reference["ids"].text
    assert ids.usage.prompt_tokens == len(IDS_PROMPT)


def test_logprobs_and_echo_equal_the_engines(rnd, reference, text_model):
    client = rnd.client()
    ref = reference["p1"]
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, logprobs=2,
                                    echo=True)
    choice = out.choices[0]
    assert choice.text == PROMPTS[1] + ref.text
    lp = choice.logprobs
    prompt_ids = text_model.tokenizer.encode(PROMPTS[1])
    P = len(prompt_ids)
    assert len(lp.tokens) == P + len(ref.token_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    _close(lp.token_logprobs[1:P], [x.logprob for x in ref.prompt_logprobs[1:]])
    _close(lp.token_logprobs[P:], [x.logprob for x in ref.logprobs])
    for k, x in enumerate(ref.logprobs):  # the alternatives, by value
        _close(sorted(lp.top_logprobs[P + k].values()), sorted(v for _, v in x.top))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # max_tokens 0 with echo scores the prompt alone.
    scored = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=0,
                                       logprobs=0, echo=True)
    assert scored.choices[0].text == PROMPTS[1] and scored.usage.completion_tokens == 0
    _close(scored.choices[0].logprobs.token_logprobs[1:],
           [x.logprob for x in ref.prompt_logprobs[1:]])
    # Chat: logprobs and top_logprobs.
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    _close([c.logprob for c in content], [x.logprob for x in reference["chat"].logprobs])
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_chat_and_streaming_equal_generate(rnd, reference):
    client = rnd.client()
    ref = reference["chat"]
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
    assert whole.choices[0].message.content == ref.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference["p0"].text


def test_n_seed_and_stop(rnd, reference):
    client = rnd.client()
    sample = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=3, seed=7,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**sample)
    again = client.completions.create(**sample)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # a seed reproduces every choice
    assert len(set(texts)) > 1  # and the choices differ
    assert first.usage.completion_tokens == 24
    other = client.completions.create(**{**sample, "seed": 8})
    assert [c.text for c in other.choices] != texts
    # Streamed with n: chunks name their choice; each choice joins to the whole one's text.
    parts: dict[int, str] = {}
    for chunk in client.completions.create(**sample, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    assert [parts[i] for i in range(3)] == texts
    # stop: the text ends before the stop string.
    text = reference["p2"].text.strip()
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text
    assert reference["p2"].text.startswith(out.choices[0].text + stop)


def test_models_auth_and_health(rnd):
    client = rnd.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        rnd.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert httpx.get(f"{rnd.url}/health").json() == {"status": "ok"}


# ---- bad input --------------------------------------------------------------------------------

BIG = 3 << 20
COMPLETION_CASES = [  # (body, status, the field the message must name)
    (b'{"prompt": ', 400, "JSON"),
    (b'{"prompt": "caf\xe9"}', 400, "UTF-8"),
    (b"[1, 2]", 400, "object"),
    (b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    (b'{"prompt": "' + b"x" * BIG + b'"}', 413, "limit"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [10**6]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "n": 1000}, 400, "n"),
    ({"prompt": "hi", "seed": "x"}, 400, "seed"),
    ({"prompt": "hi", "stop": 5}, 400, "stop"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "logprobs": 100}, 400, "logprobs"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "top_k": "x"}, 400, "top_k"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi " * 200}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
]
CHAT_CASES = [
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_object"}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, 400, "logprobs"),
]


async def _bad_requests(url: str) -> list[tuple[str, int, dict]]:
    """Every bad case, plus wrong and missing keys and an unknown route; (what, status, body)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for path, cases in (("/v1/completions", COMPLETION_CASES),
                            ("/v1/chat/completions", CHAT_CASES)):
            for body, status, field in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = await http.post(path, content=content,
                                    headers={**auth, "Content-Type": "application/json"})
                out.append((f"{path} {content[:80]!r}", r.status_code, r.json(), status, field))
        ok = {"prompt": "hi", "max_tokens": 2}
        for headers, status in (({"Authorization": "Bearer wrong"}, 401), ({}, 401)):
            r = await http.post("/v1/completions", json=ok, headers=headers)
            out.append((f"key {headers}", r.status_code, r.json(), status, "API key"))
        r = await http.get("/v1/nothing", headers=auth)
        out.append(("unknown route", r.status_code, r.json(), 404, "/v1/nothing"))
    return out


def test_bucket_rows_flag_sets_the_programs_built(rnd, emb):
    """Row buckets (the default) add the decode programs of 2 and 4 rows to those of 8;
    --no-bucket-rows (the embedded server here) builds only the full-width ones."""
    for server, built in ((rnd, 6 + 3 * 3), (emb, 6 + 3)):
        deadline = time.monotonic() + 30
        while "ready on" not in server.stderr() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"ready on {server.url} ({built} programs built" in server.stderr(), \
            server.stderr()[-2000:]


def test_bad_requests_get_4xx_naming_the_field_and_disturb_nothing(rnd, reference):
    """Over 40 malformed requests while a stream is in flight: each gets its status and an
    OpenAI-shaped error naming the field; the stream ends as if alone."""
    async def run():
        client = rnd.client(async_=True)
        stream = await client.chat.completions.create(model="tiny", messages=CHAT,
                                                      max_tokens=8, stream=True)
        bad = asyncio.ensure_future(_bad_requests(rnd.url))
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return text, await bad

    text, answers = asyncio.run(run())
    assert text == reference["chat"].text
    assert len(answers) >= 30
    for what, status, body, expected, field in answers:
        assert status == expected, (what, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert field in error["message"] or field == error["param"], (what, error)
    # Still serving.
    assert rnd.client().completions.create(model="tiny", prompt=PROMPTS[0],
                                           max_tokens=8).choices[0].text == reference["p0"].text


# ---- device faults (in-process: the app on an engine whose decode fails once) -----------------

def test_a_device_error_fails_its_request_with_500_and_the_server_goes_on(text_model,
                                                                          reference, monkeypatch):
    """A decode call that raises fails the request it served with a 500; the next request
    runs normally. A dead engine thread turns /health and new requests to 503. A full queue
    answers 429."""
    from phi3_jax import generate
    from phi3_jax.compilation import bucket_length
    from phi3_jax.engine import programs
    from phi3_jax.server.app import create_app
    from phi3_jax.server.metrics import Metrics
    from phi3_jax.server.service import WATCHDOG_PERIOD, EngineService

    # The shapes of the engine `reference` ran (model.generate): its programs are built.
    longest = max(len(c.prompt_token_ids) for c in reference.values()) + 8
    engine = text_model.engine(max_slots=8, max_len=bucket_length(longest),
                               decode_steps=generate.DECODE_STEPS)
    service = EngineService(engine, Metrics(engine))
    app = create_app(service, "tiny", warmup=False)
    real, calls = programs.decode, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(programs, "decode", flaky)
    body = {"prompt": PROMPTS[0], "max_tokens": 8}

    async def run():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            failed = await http.post("/v1/completions", json=body)
            after = await http.post("/v1/completions", json=body)
            health = await http.get("/health")
            # Should the engine's thread stop, the watchdog marks the server failed.
            await asyncio.to_thread(engine.shutdown)
            await asyncio.sleep(3 * WATCHDOG_PERIOD)
            dead = await http.get("/health"), await http.post("/v1/completions", json=body)
            return failed, after, health, dead

    failed, after, health, dead = asyncio.run(run())
    full = _queue_full(text_model)
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    assert failed.status_code == 500
    assert "injected device fault" in failed.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == reference["p0"].text
    assert health.status_code == 200
    assert [r.status_code for r in dead] == [503, 503]
    assert "thread stopped" in dead[0].json()["status"]


def _queue_full(model) -> httpx.Response:
    """A request to a server whose engine queue holds nothing (max_queue 0)."""
    from phi3_jax.server.app import create_app
    from phi3_jax.server.metrics import Metrics
    from phi3_jax.server.service import EngineService

    engine = model.engine(max_slots=1, max_len=32, max_queue=0)
    app = create_app(EngineService(engine, Metrics(engine)), "tiny", warmup=False)

    async def run():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})

    return asyncio.run(run())


# ---- load and disconnects (the embedded model) ------------------------------------------------

EQUATIONS = ["Solve 3x + 2 = 11.", "Find x if 7x = 42.", "2x + 9 = 15. What is x?",
             "Solve for x: 5x + 1 = 46"]
LENGTHS = (1, 6, 16)


def _load_request(i: int) -> tuple[str, str, int]:
    return ("chat" if i % 2 else "text", EQUATIONS[i % 4], LENGTHS[i % 3])


async def _one(client, kind: str, prompt: str, max_tokens: int, stream: bool):
    """(text, finish_reason) of a greedy request; the text prompt runs past eos."""
    common = dict(model="phi3-jax-embedded", max_tokens=max_tokens, temperature=0,
                  stream=stream)
    if kind == "chat":
        out = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common)
    else:
        out = await client.completions.create(prompt=prompt, extra_body={"ignore_eos": True},
                                              **common)
    if not stream:
        c = out.choices[0]
        return (c.message.content if kind == "chat" else c.text), c.finish_reason
    text, reason = "", None
    async for chunk in out:
        for c in chunk.choices:
            text += (c.delta.content or "") if kind == "chat" else c.text
            reason = c.finish_reason or reason
    return text, reason


def test_200_concurrent_streams_equal_single_requests(emb):
    """200 streams of mixed kinds and lengths at once: all complete within the bound, each
    equals the same request made alone; then no slot is held and nothing was compiled."""
    before = emb.metrics()

    async def run():
        client = emb.client(async_=True)
        alone = {}
        for spec in {_load_request(i) for i in range(24)}:
            alone[spec] = await _one(client, *spec, stream=False)
        together = await asyncio.wait_for(asyncio.gather(
            *[_one(client, *_load_request(i), stream=True) for i in range(200)]), 240)
        return alone, together

    start = time.monotonic()
    alone, together = asyncio.run(run())
    assert time.monotonic() - start < 300
    for i, result in enumerate(together):
        assert result == alone[_load_request(i)], i
    assert any(text.startswith("x = ") for text, _ in alone.values())  # the model solves
    after = emb.metrics()
    assert after["phi3_jax_active_slots"] == 0 and after["phi3_jax_queue_depth"] == 0
    assert after['phi3_jax_compilations_total{phase="serving"}'] == 0
    assert after['phi3_jax_compilations_total{phase="warmup"}'] > 0
    finished = 'phi3_jax_finished_requests_total{reason="length"}'
    assert after[finished] - before.get(finished, 0) >= 200 // 3


def _wait_idle(server: Server, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["phi3_jax_active_slots"] == 0 and m["phi3_jax_queue_depth"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.2)


def test_disconnects_cancel_and_free_their_slots(emb):
    """20 clients leave after their first streamed tokens, and one leaves a non-streamed
    request of 16 choices: their requests are cancelled, the slots return to zero, and the
    server keeps serving."""
    cancelled = 'phi3_jax_finished_requests_total{reason="cancelled"}'
    before = _wait_idle(emb).get(cancelled, 0)
    body = {"prompt": EQUATIONS[0], "max_tokens": 48, "ignore_eos": True}

    async def leave_early(http):
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return  # closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(base_url=emb.url, timeout=120,
                                     limits=httpx.Limits(max_connections=50)) as http:
            await asyncio.gather(*[leave_early(http) for _ in range(20)])
            await asyncio.to_thread(_wait_idle, emb)
            whole = asyncio.ensure_future(http.post("/v1/completions", json={**body, "n": 16}))
            while (await asyncio.to_thread(emb.metrics))["phi3_jax_active_slots"] == 0:
                await asyncio.sleep(0.01)
            whole.cancel()  # the client gives up: its connection closes

    asyncio.run(run())
    after = _wait_idle(emb)
    assert after[cancelled] - before >= 21
    assert httpx.get(f"{emb.url}/health").status_code == 200
    out = emb.client().completions.create(model="phi3-jax-embedded", prompt=EQUATIONS[1],
                                          max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


# ---- SIGTERM under load (last: it stops the random model's server) ----------------------------

def test_sigterm_under_load_finishes_or_fails_each_request_and_exits_0(rnd):
    """SIGTERM while 24 streams and 4 whole requests run: each stream either completes or ends
    with an error chunk, each whole request gets 200 or an error status; new connections are
    refused; the process exits 0 within the grace period, without a traceback."""
    async def stream(client, started):
        try:
            out = await client.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=40, stream=True,
                extra_body={"ignore_eos": True})
            reason = None
            async for chunk in out:
                started.set()
                for c in chunk.choices:
                    reason = c.finish_reason or reason
        except openai.APIError as e:  # the final error chunk
            return "error", str(e)
        finally:
            started.set()  # a request that fails early does not hold the test up
        return "done", reason

    async def whole(client):
        try:
            out = await client.completions.create(model="tiny", prompt=PROMPTS[0],
                                                  max_tokens=40, extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            return "error", e.status_code
        return "done", out.choices[0].finish_reason

    async def run():
        client = rnd.client(async_=True)
        wholes = [asyncio.ensure_future(whole(client)) for _ in range(4)]
        events = [asyncio.Event() for _ in range(24)]
        streams = [asyncio.ensure_future(stream(client, e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*[e.wait() for e in events]), 120)
        rnd.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams, *wholes), 60)
        try:
            late = (await httpx.AsyncClient().post(f"{rnd.url}/v1/completions")).status_code
        except httpx.TransportError:
            late = "refused"
        return results, late

    results, late = asyncio.run(run())
    assert rnd.proc.wait(timeout=60) == 0, rnd.stderr()
    stderr = rnd.stderr()
    assert "Traceback" not in stderr, stderr
    assert "SIGTERM" in stderr
    for outcome, detail in results:
        assert (outcome, detail) in {("done", "length"), ("error", 503)} or (
            outcome == "error" and "shutting down" in detail), (outcome, detail)
    assert late in ("refused", 503)
