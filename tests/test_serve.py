"""The OpenAI-compatible server on a tiny converted checkpoint, driven by the real `openai` client.

One module-scoped server (4 slots, 12 queue places, 256 tokens of context) on a random free port;
tests that need the engine slow or failing patch its sampler for their duration only.
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
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_model

import gemma_jax as gj
from gemma_jax import checkpoint
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler
from gemma_jax.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from gemma_jax.serve import Engine, create_app  # noqa: E402  (needs the serve extra)
from gemma_jax.serve.engine import StopStrings  # noqa: E402

CONFIG = gj.gemma2_tiny(sliding_window=16)
MODEL = "tiny-gemma"
CONTEXT = 256
STOP_IDS = [1, 107]  # <eos>, <end_of_turn>, as in the -it checkpoints' generation_config.json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """A random HF Gemma-2 saved with save_pretrained plus the tiny tokenizer, converted to gemma_jax (float32)."""
    import torch

    hf = hf_model(CONFIG, seed=0)
    with torch.no_grad():  # a small embedding: greedy text varies instead of repeating its input
        hf.model.embed_tokens.weight.normal_(0.0, 0.05)
    root = tmp_path_factory.mktemp("serve")
    hf.save_pretrained(root / "hf")
    shutil.copy(tiny_tokenizer.model_file, root / "hf" / "tokenizer.model")
    (root / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS}))
    return checkpoint.convert_hf(root / "hf", root / "ckpt", dtype="float32", progress=False)


class Server:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(engine, model_name=MODEL), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

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


def post(url: str, body: bytes | dict) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
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
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, ["logprobs", "not supported"]),
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
    """The worker is held in a prefill: 1 request in it + 15 waiting fill the 16 places; the 17th gets 429."""
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
        server.wait_for(lambda: server.metric("gemma_jax_queue_depth") == 15)
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
def test_cli_serves_8bit_and_shuts_down_on_sigterm(ckpt, dtype):
    """`python -m gemma_jax.serve --dtype fp8` (or int8): compiles, opens the port, answers; SIGTERM shuts it down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gemma_jax.serve", "--checkpoint", str(ckpt), "--port", str(port)]
    command += ["--dtype", dtype, "--cache-length", "128", "--slots", "2", "--served-model-name", MODEL]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout and proc.stdout.read()
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health").status == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log, log  # drained, then uvicorn re-raises the signal
        assert proc.returncode == -signal.SIGTERM
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
