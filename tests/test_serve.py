"""The OpenAI-compatible server on a tiny converted checkpoint, driven by the real `openai` client.

One module-scoped server (4 slots, 12 queue places, 256 tokens of context, the small limits of
POLICY) on a random free port; tests that need the engine slow or failing patch its sampler for
their duration only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import shutil
import signal
import socket
import threading
import time
import types
import urllib.error
import urllib.request
from email.message import Message

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_model, start_server

import gemma_jax as gj
from gemma_jax import checkpoint
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler
from gemma_jax.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from gemma_jax.serve import Engine, create_app  # noqa: E402  (needs the serve extra)
from gemma_jax.serve.engine import StopStrings  # noqa: E402
from gemma_jax.serve.policy import Policy  # noqa: E402
from gemma_jax.serve.server import make_server  # noqa: E402

CONFIG = gj.gemma2_tiny(sliding_window=16)
MODEL = "tiny-gemma"
CONTEXT = 256
STOP_IDS = [1, 107]  # <eos>, <end_of_turn>, as in the -it checkpoints' generation_config.json
POLICY = Policy(max_body_bytes=64 * 1024, max_n=8, max_stop=4, max_stop_chars=16, request_timeout=2.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """A random HF Gemma-2 saved with save_pretrained plus the tiny tokenizer, converted to gemma_jax (float32);
    its tokenizer_config.json carries a chat template, as an instruction-tuned checkpoint's does."""
    import torch

    hf = hf_model(CONFIG, seed=0)
    with torch.no_grad():  # a small embedding: greedy text varies instead of repeating its input
        hf.model.embed_tokens.weight.normal_(0.0, 0.05)
    root = tmp_path_factory.mktemp("serve")
    hf.save_pretrained(root / "hf")
    shutil.copy(tiny_tokenizer.model_file, root / "hf" / "tokenizer.model")
    (root / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS}))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}..."}))
    return checkpoint.convert_hf(root / "hf", root / "ckpt", dtype="float32", progress=False)


class Server:
    """The server (`make_server`) on 127.0.0.1 and a free port, in a thread."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy = POLICY,
        drain_timeout: float | None = None,
        model_name: str = MODEL,
        **app_options,
    ):
        self.engine = engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, model_name=model_name, policy=policy, **app_options)
        self.uvicorn = make_server(app, engine, drain_timeout=drain_timeout, log_level="warning")
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)

    def metric(self, name: str, labels: str = "") -> float:
        text = urllib.request.urlopen(f"{self.url}/metrics").read().decode()
        match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_for(self, condition, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.02)


def make_engine(ckpt, **kwargs) -> Engine:
    model = checkpoint.load_model(ckpt, dtype=jnp.float32)
    sampler = Sampler(model, Tokenizer.from_dir(ckpt), cache_length=CONTEXT)
    engine = Engine(sampler, slots=4, decode_steps=4, **kwargs)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(make_engine(ckpt, max_queue=12))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(server):
    """`Sampler.generate` one prompt at a time: the same weights, float32."""

    def generate(prompt, max_tokens, chat=False):
        (c,) = server.engine.sampler.generate([prompt], max_new_tokens=max_tokens, chat=chat)
        return c

    return generate


def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


PROMPTS = [
    "The quick brown fox",
    "Hello world! How are you today?",
    "def main():\n    return 42",
    "Gemma is a family of lightweight open models; JAX and Flax make TPUs easy to use. " * 2,
    "Numbers 0123456789",
    "café naïve",
    "JAX",
    "The lazy dog jumps over the quick brown fox and then sleeps for a while, dreaming of TPUs.",
]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    assert json.loads(urllib.request.urlopen(f"{server.url}/health").read()) == {"status": "ok"}
    assert server.metric("gemma_jax_slots") == 4


def test_completion_and_chat_match_sampler(server, reference):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    ref = reference(PROMPTS[0], 20)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(server.engine.sampler.tokenizer.encode(PROMPTS[0]))
    assert out.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    ids = server.engine.sampler.tokenizer.encode_chat([{"role": "user", "content": "Be brief.\n\n" + PROMPTS[1]}])
    ref = reference(ids, 24)
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == ref.finish_reason
    assert chat.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(server):
    client = server.client()
    kwargs = dict(model=MODEL, max_tokens=30, temperature=0)
    whole = client.completions.create(prompt=PROMPTS[2], **kwargs)
    chunks = list(client.completions.create(prompt=PROMPTS[2], stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": PROMPTS[3]}]
    whole = client.chat.completions.create(messages=messages, **kwargs)
    chunks = list(
        client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_sixteen_concurrent_requests_equal_one_at_a_time(server, reference):
    """4 slots, 16 requests of different prompt and output lengths: rows join and leave the running batch."""
    tok = server.engine.sampler.tokenizer
    cases = [(PROMPTS[i % len(PROMPTS)], 18 + i, i % 2 == 1) for i in range(16)]  # (prompt, max_tokens, chat)

    async def one(client, prompt, max_tokens, chat):
        if chat:
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
            )
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    async def run_all():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, *case) for case in cases))

    served = asyncio.run(run_all())
    expected = []
    for prompt, max_tokens, chat in cases:
        c = reference(prompt, max_tokens, chat=chat)
        expected.append((c.text, c.finish_reason))
    assert served == expected
    assert len({len(tok.encode(p)) for p, _, _ in cases}) > 4  # the prompts really differ in length
    server.wait_for(lambda: server.metric("gemma_jax_active_slots") == 0)


def test_sampling_params_are_data_no_recompiles(server):
    """Requests with new temperatures, filters, seeds, budgets and stops reuse the compiled programs."""
    client = server.client()
    jitted = (sampler_lib._decode, sampler_lib.start, sampler_lib.insert, sampler_lib._prefill_chunk)
    client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=5, temperature=0)  # bucket compiled
    before = [f._cache_size() for f in jitted]
    settings = [
        dict(temperature=0.7, top_p=0.9, seed=1, max_tokens=9),
        dict(temperature=1.3, extra_body={"top_k": 20, "min_p": 0.05}, seed=2, max_tokens=3),
        dict(temperature=0.0, stop=["e", "th"], max_tokens=12),
        dict(temperature=1.0, seed=123456789012, max_tokens=7),
    ]
    for s in settings:
        client.completions.create(model=MODEL, prompt=PROMPTS[4], **s)
    assert [f._cache_size() for f in jitted] == before
    seeded = [client.completions.create(model=MODEL, prompt=PROMPTS[4], temperature=1.0, seed=7, max_tokens=12)]
    seeded.append(client.completions.create(model=MODEL, prompt=PROMPTS[4], temperature=1.0, seed=7, max_tokens=12))
    assert seeded[0].choices[0].text == seeded[1].choices[0].text


def test_stop_strings_cut_at_the_first_match_however_the_text_is_split():
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(list("abc"), rng.integers(0, 20)))
        stops = ["".join(rng.choice(list("abc"), rng.integers(1, 4))) for _ in range(rng.integers(1, 3))]
        cuts = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 5)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher, out, hit = StopStrings(stops), [], False
        for piece in pieces:
            emitted, hit = matcher.push(piece)
            out.append(emitted)
            if hit:
                break
        if not hit:
            out.append(matcher.flush())
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        assert ("".join(out), hit) == ((text[: min(hits)], True) if hits else (text, False)), (text, stops, pieces)


def test_stop_strings_streaming_holds_back_partial_matches(server, reference):
    client = server.client()
    ref = reference(PROMPTS[5], 30)
    assert len(ref.text) > 12, ref.text
    stop = ref.text[8:11]
    cut = ref.text[: ref.text.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=PROMPTS[5], max_tokens=40, temperature=0, stop=stop, stream=True
        )
    ]
    assert "".join(pieces) == cut


def test_n_choices_and_prompt_batches(server, reference):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[6:8], n=2, max_tokens=20, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts == [reference(PROMPTS[6], 20).text] * 2 + [reference(PROMPTS[7], 20).text] * 2
    tok = server.engine.sampler.tokenizer
    assert out.usage.prompt_tokens == len(tok.encode(PROMPTS[6])) + len(tok.encode(PROMPTS[7]))


BAD = [  # (path, body, status, words the error message must contain)
    ("/v1/completions", b'{"model": "tiny-gemma", "prompt": ', 400, ["not valid JSON"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temprature": 0}, 400, ["temprature"]),
    ("/v1/chat/completions", {"model": MODEL}, 400, ["messages", "required"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1}}, 400, ["logit_bias", "not supported"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, ["top_p"]),
    ("/v1/completions", {"model": MODEL, "prompt": [5000, 2]}, 400, ["token ids"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 300, "max_tokens": 4}, 400, ["256", "prompt"]),
    ("/v1/completions", {"model": MODEL, "prompt": "The fox", "max_tokens": 255}, 400, ["256", "255"]),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, ["role"]),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, ["gpt-9"]),
    ("/v1/nothing", {}, 404, ["/v1/nothing"]),
]


def test_bad_requests_get_openai_errors_and_the_server_survives(server):
    for path, body, status, words in BAD:
        code, reply, _ = post(server.url + path, body)
        assert code == status, (path, body, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert all(w in error["message"] for w in words), (words, error["message"])
    with pytest.raises(openai.BadRequestError):  # the client sees them as the usual exceptions
        server.client().completions.create(model=MODEL, prompt="x", max_tokens=0)
    out = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


@contextlib.contextmanager
def patched(monkeypatch, sampler, name, wrapper):
    """Replace `sampler.<name>` with wrapper(original) for the block."""
    original = getattr(sampler, name)
    with monkeypatch.context() as m:
        m.setattr(sampler, name, wrapper(original))
        yield


def slowed(seconds: float):
    """A wrapper for `patched` that makes each call `seconds` slower."""

    def wrap(fn):
        def run(*args):
            time.sleep(seconds)
            return fn(*args)

        return run

    return wrap


def test_full_queue_answers_429(server, monkeypatch):
    """The worker is held in a prefill: the 16 requests fill the 4 slots and 12 queue places; the 17th gets 429.

    How many of them the held admission took (1 to 4, batched) depends on arrival timing, so the test waits for
    the engine to count all 16 in flight rather than for a queue depth."""
    gate = threading.Event()

    def held(prefill):
        def run(*args):
            gate.wait(30)
            return prefill(*args)

        return run

    client = server.client()
    with patched(monkeypatch, server.engine.sampler, "prefill", held), concurrent.futures.ThreadPoolExecutor(16) as ex:
        futures = [
            ex.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=4, temperature=0)
            for p in PROMPTS * 2
        ]
        server.wait_for(lambda: server.engine._in_flight == server.engine.capacity)
        code, reply, headers = post(f"{server.url}/v1/completions", {"model": MODEL, "prompt": "x"})
        gate.set()
        results = [f.result(60) for f in futures]
    assert code == 429 and reply["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)


def test_disconnect_mid_stream_frees_the_slot(server, monkeypatch):
    client = server.client()
    prompt = PROMPTS[0]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, temperature=0)
    assert full.choices[0].finish_reason == "length"  # so only a cancel can end it early

    cancelled = server.metric("gemma_jax_requests_total", '{finish_reason="cancelled"}')
    with patched(monkeypatch, server.engine.sampler, "decode", slowed(0.03)):
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, temperature=0, stream=True)
        for _ in zip(range(3), stream, strict=False):
            pass
        assert server.metric("gemma_jax_active_slots") == 1
        stream.close()
        server.wait_for(lambda: server.metric("gemma_jax_active_slots") == 0, timeout=5)
        assert server.metric("gemma_jax_requests_total", '{finish_reason="cancelled"}') == cancelled + 1
        # A non-streaming client that hangs up is cancelled too.
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 200}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        )
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            server.wait_for(lambda: server.metric("gemma_jax_active_slots") == 1, timeout=5)
        server.wait_for(lambda: server.metric("gemma_jax_active_slots") == 0, timeout=5)
    assert server.metric("gemma_jax_requests_total", '{finish_reason="cancelled"}') == cancelled + 2
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_a_failing_request_does_not_take_the_server_down(server, monkeypatch):
    marker = 77  # prompts ending in this id fail inside the engine

    def failing(prefill):
        def run(cache, prompts):
            if prompts[0][-1] == marker:
                raise RuntimeError("injected failure")
            return prefill(cache, prompts)

        return run

    client = server.client()
    with patched(monkeypatch, server.engine.sampler, "prefill", failing):
        code, reply, _ = post(f"{server.url}/v1/completions", {"model": MODEL, "prompt": [2, 9, marker]})
        assert code == 500 and "injected failure" in reply["error"]["message"]
        with pytest.raises(openai.APIError, match="injected failure"):  # the stream's error event
            list(client.completions.create(model=MODEL, prompt=[2, 9, marker], stream=True, max_tokens=3))
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert server.metric("gemma_jax_requests_total", '{finish_reason="error"}') == 2


def test_shutdown_drains_in_flight_streams(ckpt, reference, monkeypatch):
    """A second server on the same compiled programs: stopping it lets a running stream finish."""
    other = Server(make_engine(ckpt, max_queue=0))

    prompt = PROMPTS[0]
    with patched(monkeypatch, other.engine.sampler, "decode", slowed(0.05)):
        stream = other.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True
        )
        pieces = [next(iter(stream)).choices[0].text]
        other.uvicorn.should_exit = True
        pieces += [c.choices[0].text for c in stream]
        other.thread.join(30)
    assert not other.thread.is_alive()
    assert "".join(pieces) == reference(prompt, 30).text
    with pytest.raises(openai.APIConnectionError):
        other.client().models.list()


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_cli_serves_8bit_and_shuts_down_on_sigterm(base_ckpt, dtype):
    """`python -m gemma_jax.serve --dtype fp8` (or int8): compiles, opens the port, answers; SIGTERM shuts it down
    gracefully, at once although connections hold half a request, and the exit status is 0. The checkpoint is a
    base model: --chat forces the template; the model is named by the directory's name."""
    args = ["--checkpoint", str(base_ckpt), "--dtype", dtype, "--cache-length", "128", "--slots", "2", "--chat"]
    args += ["--max-prompt-tokens", "32"]  # one prompt bucket to compile
    proc, url = start_server(args, timeout=180)
    port = int(url.rsplit(":", 1)[1])
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(base_ckpt)]  # --checkpoint as given
        messages = [{"role": "user", "content": PROMPTS[0]}]
        out = client.chat.completions.create(model=base_ckpt.name, messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
        body = json.dumps({"model": MODEL, "messages": messages}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30)) for _ in range(5)]
            for sock in held:
                sock.sendall(head + body[:10])
            time.sleep(0.5)  # they have arrived
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            assert time.monotonic() - start < 10  # not --request-timeout (30 s): half requests are refused at once
            assert reply_error(held[0].recv(65536))[0] == 503
        log = proc.stdout.read()
        assert "Application shutdown complete" in log, log
        assert proc.returncode == 0, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_over_a_mesh_matches_one_device(ckpt, reference):
    """data=4 x tensor=2 over the 8 CPU devices: sharded batch cache, rows inserted into it, same greedy text."""
    from gemma_jax import sharding
    from gemma_jax.serve import GenerationParams

    mesh = sharding.make_mesh("data=4,tensor=2")
    model = checkpoint.load_model(ckpt, dtype=jnp.float32, mesh=mesh)
    engine = Engine(Sampler(model, Tokenizer.from_dir(ckpt), cache_length=CONTEXT, mesh=mesh), slots=4)
    prompts = PROMPTS[:3] + PROMPTS[4:7]  # more than the 4 slots (rows are reused), one prefill bucket

    async def serve() -> list[str]:
        engine.start()
        ids = [engine.sampler.tokenizer.encode(p) for p in prompts]
        handle = engine.submit(ids, [GenerationParams(max_tokens=12, temperature=0)] * len(ids))
        texts = [""] * len(ids)
        async for i, out in handle:
            texts[i] += out.text
        await engine.close()
        return texts

    assert asyncio.run(serve()) == [reference(p, 12).text for p in prompts]


# -- hardening: bounds, strict types, timeouts, access, shutdown -----------------------------------------------


@contextlib.contextmanager
def health_answers_within(url: str, seconds: float = 1.0):
    """Poll /health every 50 ms in a thread for the block, and once after: each answer must come within `seconds`."""
    stop, slowest = threading.Event(), []

    def get() -> float:
        start = time.monotonic()
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).read()
        except urllib.error.HTTPError:  # 503 while shutting down is an answer too
            pass
        except OSError:
            return float("inf")
        return time.monotonic() - start

    def poll() -> None:
        while not stop.is_set():
            slowest.append(get())
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    slowest.append(get())
    assert max(slowest) < seconds, f"/health took {max(slowest):.2f} s"


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (fails if it does not in `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def reply_error(reply: bytes) -> tuple[int, dict]:
    """(status, error object) of a raw HTTP reply with an OpenAI error body."""
    head, _, body = reply.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return int(head.split()[1]), error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
STRICT = [  # (path, body, param, words the message must contain): each a 400 naming the right field
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, "seed", ["less than"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1e30, "n": 2}, "seed", ["integer"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 2**31}, "top_k", ["less than"]),
    ("/v1/completions", {"model": "\ud800", "prompt": "x"}, "model", ["surrogate"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x\ud800"}, "prompt", ["surrogate"]),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
        "messages.0.content",
        ["surrogate"],
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
        "messages.0.content.0.text",
        ["surrogate"],
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 1e300}, "temperature", ["1e+300", "float32"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": float("inf")}, "temperature", ["finite"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, "max_tokens", ["integer"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, "max_tokens", ["integer"]),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream", ["boolean"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, "stop", ["at least 1 character"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "metadata": {"k": "\udc00"}}, "metadata.k", ["surrogate"]),
    ("/v1/chat/completions", {**CHAT, "n": 10**9}, "n", ["at most 8", "--max-n"]),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3}, "prompt", ["9 completions", "8"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, "stop", ["at most 4", "--max-stop"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": "y" * 17}, "stop", ["16 characters"]),
]


def test_bad_values_and_types_get_400_naming_the_field(server):
    """Values that overflowed (500), were coerced ("10", true, "yes") or blamed the wrong field, and the bounds."""
    with health_answers_within(server.url):
        for path, body, param, words in STRICT:
            start = time.monotonic()
            code, reply, _ = post(server.url + path, json.dumps(body).encode())  # ensure_ascii: "\ud800" escapes
            assert (code, reply["error"]["param"]) == (400, param), (body, reply)
            assert set(reply["error"]) == {"message", "type", "param", "code"}
            assert all(w in reply["error"]["message"] for w in words), (words, reply)
            assert time.monotonic() - start < 1, body
        for raw, words in ((b"", ["empty"]), (b"  ", ["empty"]), (b"[1]", ["JSON object"]), (b"[" * 50_000, ["JSON"])):
            code, reply, _ = post(f"{server.url}/v1/chat/completions", raw)
            assert (code, reply["error"]["param"]) == (400, None) and all(w in reply["error"]["message"] for w in words)
    out = server.client().completions.create(model=MODEL, prompt="x", max_tokens=2, seed=2**63 - 1, n=2)
    assert len(out.choices) == 2  # the largest seed works, and seed + 1 wraps around


def test_bodies_over_the_limit_are_refused_unread(server):
    """413 from the Content-Length alone (no byte of a 20 MB body sent), or as soon as a chunked body passes it."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with health_answers_within(server.url):
        status, error = reply_error(raw_request(server.port, f"{head}Content-Length: 20000000\r\n\r\n".encode()))
        assert status == 413 and error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]
        chunk = b"[" + b"1," * 20_000
        chunked = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
        assert reply_error(raw_request(server.port, chunked))[0] == 413  # the server closes without the rest


def test_half_open_connections_are_closed(server):
    """Nothing sent, half the headers, half a body: each connection is closed after --request-timeout (2 s)."""
    body = json.dumps(CHAT).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with health_answers_within(server.url), concurrent.futures.ThreadPoolExecutor(3) as pool:
        start = time.monotonic()
        idle, half_head, half_body = pool.map(
            lambda data: raw_request(server.port, data, timeout=6), [b"", head[:30], head + body[:10]]
        )
        assert time.monotonic() - start < 5
    assert idle == b""
    for reply in (half_head, half_body):
        status, error = reply_error(reply)
        assert status == 408 and "--request-timeout" in error["message"]
    assert server.client().chat.completions.create(**CHAT).choices  # a normal request still works


@pytest.fixture(scope="module")
def secured(ckpt):
    """A second server with an API key, allowed hosts and a prompt-token bound."""
    policy = Policy(api_key="s3cret", allowed_hosts=("127.0.0.1", "*.example.com"), max_prompt_tokens=20)
    s = Server(make_engine(ckpt, max_queue=4), policy)
    yield s
    s.stop()


def test_api_key_and_allowed_hosts(secured):
    url = secured.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        code, reply, response_headers = post(f"{url}/v1/completions", {"model": MODEL, "prompt": "x"}, headers)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key", reply
        assert response_headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        secured.client().models.list()
    assert urllib.request.urlopen(f"{url}/health").status == 200  # open to load balancers
    client = secured.client(api_key="s3cret")
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
    with pytest.raises(openai.BadRequestError, match="--max-prompt-tokens"):
        client.completions.create(model=MODEL, prompt=list(range(5, 26)), max_tokens=2)
    auth = "Authorization: Bearer s3cret\r\n"
    for host, status in (("evil.test", 400), ("127.0.0.1:1", 200), ("api.example.com", 200), ("example.com", 400)):
        reply = raw_request(
            secured.port, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode()
        )
        assert int(reply.split()[1]) == status, (host, reply)


def test_a_large_body_is_parsed_off_the_event_loop(secured):
    """A 1.5 MB body (under the default 2 MiB limit) of 300k token ids: /health answers throughout."""
    body = {"model": MODEL, "prompt": list(range(5, 505)) * 600}
    with health_answers_within(secured.url):
        code, reply, _ = post(f"{secured.url}/v1/completions", body, {"Authorization": "Bearer s3cret"})
    assert (code, reply["error"]["param"]) == (400, "prompt") and "--max-prompt-tokens" in reply["error"]["message"]


def test_exposed_server_without_api_key_warns(server, caplog):
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)):
        caplog.clear()
        app = create_app(server.engine, model_name=MODEL, policy=Policy(api_key=key))
        make_server(app, server.engine, host=host)
        assert ("WITHOUT AN API KEY" in caplog.text) == warned, (host, key)


def test_policy_flags(monkeypatch):
    from gemma_jax.serve.__main__ import build_parser
    from gemma_jax.serve.policy import from_args

    monkeypatch.setenv("GEMMA_JAX_API_KEY", "from-env")
    base = ["--checkpoint", "x"]
    assert from_args(build_parser().parse_args(base)) == Policy(api_key="from-env")
    flags = ["--max-n", "4", "--max-body-bytes", "1000", "--request-timeout", "0.5", "--allowed-hosts", "A.b, c"]
    policy = from_args(build_parser().parse_args([*base, *flags, "--api-key", "k"]))
    assert (policy.max_n, policy.max_body_bytes, policy.request_timeout) == (4, 1000, 0.5)
    assert (policy.allowed_hosts, policy.api_key) == (("a.b", "c"), "k")
    for bad in (["--max-n", "0"], ["--request-timeout", "nan"], ["--max-body-bytes", "x"], ["--api-key", " "]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])


def test_drain_deadline_ends_streams_with_an_error_event_and_done(ckpt, monkeypatch):
    """--drain-timeout 0.5: a stream still running at the deadline gets an error event, then [DONE]."""
    other = Server(make_engine(ckpt, max_queue=0), drain_timeout=0.5)
    request = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
    body = json.dumps(request).encode()  # greedy: runs all 200 tokens (see test_disconnect_mid_stream_frees_the_slot)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    with patched(monkeypatch, other.engine.sampler, "decode", slowed(0.05)):
        with socket.create_connection(("127.0.0.1", other.port), timeout=30) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            reply = b""
            while b"data: {" not in reply:  # the stream has begun
                reply += sock.recv(65536)
            start = time.monotonic()
            other.uvicorn.should_exit = True
            while chunk := sock.recv(65536):
                reply += chunk
        other.thread.join(30)
    assert not other.thread.is_alive() and time.monotonic() - start < 10
    events = [line.removeprefix("data: ") for line in reply.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "--drain-timeout" in error["message"]
    cancelled = other.engine.metrics.registry.get_sample_value(
        "gemma_jax_requests_total", {"finish_reason": "cancelled"}
    )
    assert cancelled == 1


@pytest.fixture(scope="module")
def base_ckpt(ckpt, tmp_path_factory):
    """The same weights without a chat template: a base model, as the embedded default is."""
    base = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(ckpt, base)
    (base / "tokenizer_config.json").unlink()
    return base


class NoEngine:
    """Stands in for an Engine where a request is answered before it reaches one."""

    running = True

    def __init__(self, tokenizer: Tokenizer):
        self.sampler = types.SimpleNamespace(tokenizer=tokenizer, cache_length=CONTEXT)

    def start(self) -> None:
        pass

    def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


def test_a_base_model_refuses_chat_and_points_to_completions(ckpt, base_ckpt):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    for tokenizer, forced in ((Tokenizer.from_dir(base_ckpt), None), (Tokenizer.from_dir(ckpt), False)):
        s = Server(NoEngine(tokenizer), chat=forced)
        try:
            code, reply, _ = post(f"{s.url}/v1/chat/completions", chat)
        finally:
            s.stop()
        assert code == 400 and reply["error"]["param"] == "model"
        message = reply["error"]["message"]
        assert all(w in message for w in ("base (pretrained) model", "/v1/completions", "instruction-tuned", "--chat"))


def test_the_served_name_accepts_the_checkpoint_as_given_and_its_directory_name(tiny_tokenizer):
    s = Server(NoEngine(tiny_tokenizer), model_name="~/ckpt/sppo-iter2", aliases=["sppo-iter2"])
    try:
        client = s.client()
        assert [m.id for m in client.models.list().data] == ["~/ckpt/sppo-iter2"]  # the name to use
        assert client.models.retrieve("sppo-iter2").id == "~/ckpt/sppo-iter2"
        with pytest.raises(openai.NotFoundError, match="serves '~/ckpt/sppo-iter2'"):
            client.models.retrieve("other")
    finally:
        s.stop()


def test_served_names(tmp_path, monkeypatch):
    from gemma_jax.serve.__main__ import served_names

    (tmp_path / "ckpt" / "sppo-iter2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert served_names(None) == ["gemma-3-270m"]  # the embedded default model
    assert served_names("UCLA-AGI/Gemma-2-9B-It-SPPO-Iter2") == ["UCLA-AGI/Gemma-2-9B-It-SPPO-Iter2"]
    assert served_names("ckpt/sppo-iter2/") == ["ckpt/sppo-iter2/", "sppo-iter2"]
    assert served_names("ckpt/sppo-iter2", "sppo") == ["sppo", "ckpt/sppo-iter2", "sppo-iter2"]


def test_without_a_checkpoint_the_cli_serves_the_default_model(base_ckpt, monkeypatch):
    """As `python -m gemma_jax.sample` does: the embedded model (here stood in for by the tiny base checkpoint),
    in float32, under its model card's name, with slots and context sized for a CPU; a base model."""
    from gemma_jax import default_model
    from gemma_jax.serve import __main__ as serve_main

    ensured, served = [], []
    monkeypatch.setattr(default_model, "ensure", lambda cache=None: ensured.append(cache) or base_ckpt)
    monkeypatch.setattr(serve_main.sharding, "maybe_initialize_distributed", lambda *a: False)
    monkeypatch.setattr(serve_main.Engine, "warmup", lambda self: None)
    monkeypatch.setattr(serve_main, "create_app", lambda engine, **options: served.append((engine, options)))
    monkeypatch.setattr(serve_main.server, "make_server", lambda app, engine, **kw: None)
    monkeypatch.setattr(serve_main.server, "run", lambda server: 0)
    assert serve_main.main([]) == 0
    ((engine, options),) = served
    assert ensured == [None] and (options["model_name"], options["aliases"]) == ("gemma-3-270m", [])
    assert engine.sampler.cache_dtype == jnp.float32 and not engine.sampler.tokenizer.instruction_tuned
    assert (engine.slots, engine.sampler.cache_length) == (4, 2048)  # sized for a CPU, as the sampler's defaults
