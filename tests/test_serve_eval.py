"""Evaluation clients on a tiny checkpoint: logprobs (chat and completions), echo, penalties, the tokenizer
endpoints, and lm-eval-harness's `local-completions` against `python -m gemma_jax.serve`.

References are computed from the model's own logits by a plain forward (no cache, no sampler), in float32.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_serve  # skips this module without the serve extra and the openai client
from test_serve import MODEL, Server, post

from gemma_jax import checkpoint
from gemma_jax import sampler as sampler_lib
from gemma_jax.sampler import Sampler
from gemma_jax.serve import Engine, GenerationParams
from gemma_jax.tokenizer import Tokenizer

CONTEXT = 256
ckpt = test_serve.ckpt  # the tiny checkpoint fixture, built once for this module too
TASKS = pathlib.Path(__file__).parent / "data" / "lm_eval"
TEXT = "Gemma is a family of lightweight open models; JAX and Flax make TPUs easy to use. The quick brown fox jumps."


@pytest.fixture(scope="module")
def model(ckpt):
    return checkpoint.load_model(ckpt, dtype=jnp.float32)


@pytest.fixture(scope="module")
def server(model, ckpt):
    """prefill_chunk 32: a prompt of ~60 tokens is scored over several chunks. Prompts of up to 96 tokens (the
    tests' are shorter): three prompt buckets to compile, not eight."""
    sampler = Sampler(model, Tokenizer.from_dir(ckpt), cache_length=CONTEXT, prefill_chunk=32)
    engine = Engine(sampler, slots=4, max_prompt_tokens=96)
    engine.warmup()
    s = Server(engine)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def forward(model):
    """ids -> (logits, log_softmax), each [len(ids), V] float32: the model's at each position of one row."""
    run = jax.jit(lambda tokens: (lambda x: (x, jax.nn.log_softmax(x, axis=-1)))(model(tokens)[0][0]))

    @functools.cache
    def cached(ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros((1, CONTEXT), np.int32)  # padding after the ids: causal, so it changes nothing before
        padded[0, : len(ids)] = ids
        return tuple(np.asarray(x)[: len(ids)] for x in run(padded))

    return lambda ids: cached(tuple(ids))


@pytest.fixture(scope="module")
def log_softmax(forward):
    return lambda ids: forward(ids)[1]


def expected_logprobs(log_softmax, ids: list[int]) -> np.ndarray:
    """The logprob of ids[1:], each under the logits of the position before it."""
    lp = log_softmax(ids)
    return lp[np.arange(len(ids) - 1), ids[1:]]


def top(log_softmax, ids: list[int], k: int) -> np.ndarray:
    """[len(ids) - 1, k]: the k best logprobs after each prefix, best first."""
    return -np.sort(-log_softmax(ids), axis=-1)[:-1, :k]


def test_completion_logprobs_and_echo_equal_the_models_log_softmax(server, log_softmax):
    """Every prompt and completion token's logprob (float32, 1e-4), the top 3 alternatives, echo's text."""
    tok, client = server.engine.sampler.tokenizer, server.client()
    prompt = tok.encode(TEXT)
    assert len(prompt) > 2 * 32  # scored over several prefill chunks
    (ref,) = server.engine.sampler.generate([prompt], max_new_tokens=8)
    ids = prompt + ref.token_ids
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=3)
    choice = choice_of(out)
    assert choice.text == tok.decode(prompt) + ref.text
    assert choice.logprobs.tokens == [tok.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], expected_logprobs(log_softmax, ids), atol=1e-4)
    for given, best in zip(choice.logprobs.top_logprobs[1:], top(log_softmax, ids, 3), strict=True):
        values = list(given.values())  # ids with the same text (byte pieces) share an entry: the best one's
        np.testing.assert_allclose(values[0], best[0], atol=1e-4)
        assert all(np.isclose(v, best, atol=1e-4).any() for v in values) and values == sorted(values, reverse=True)
    assert choice.logprobs.text_offset[len(prompt)] == len(tok.decode(prompt))

    # Without echo: the completion's tokens only; streamed: the same, in pieces.
    plain = choice_of(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0))
    np.testing.assert_allclose(plain.logprobs.token_logprobs, choice.logprobs.token_logprobs[len(prompt) :], atol=1e-5)
    assert plain.logprobs.top_logprobs == [{}] * len(ref.token_ids)
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=3, stream=True
    )
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.text for c in chunks) == choice.text
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == choice.logprobs.token_logprobs


def choice_of(out):
    (choice,) = out.choices
    return choice


def test_chat_logprobs_and_top_logprobs(server, log_softmax):
    tok, client = server.engine.sampler.tokenizer, server.client()
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    prompt = tok.encode_chat(messages)
    (ref,) = server.engine.sampler.generate([prompt], max_new_tokens=6)
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = choice_of(out).logprobs.content
    ids = prompt + ref.token_ids
    assert [c.token for c in content] == [tok.decode([t]) for t in ref.token_ids]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    expected = expected_logprobs(log_softmax, ids)[len(prompt) - 1 :]
    np.testing.assert_allclose([c.logprob for c in content], expected, atol=1e-4)
    tops = [[t.logprob for t in c.top_logprobs] for c in content]
    np.testing.assert_allclose(tops, top(log_softmax, ids, 2)[len(prompt) - 1 :], atol=1e-4)
    assert choice_of(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)).logprobs is None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        c for chunk in stream if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content
    ]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]


def test_echo_with_zero_max_tokens_scores_prompts(server, log_softmax):
    """What a loglikelihood client sends: prompts of different lengths, echo, logprobs, max_tokens 0."""
    tok = server.engine.sampler.tokenizer
    prompts = [tok.encode(TEXT), tok.encode("The quick brown fox")]
    out = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    for choice, ids in zip(out.choices, prompts, strict=True):
        assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
        assert choice.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], expected_logprobs(log_softmax, ids), atol=1e-4)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == sum(map(len, prompts))


def greedy(forward, prompt: list[int], steps: int, stop_ids, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy tokens under the penalties as OpenAI (presence, frequency over the completion so far) and HF
    (repetition, over prompt and completion) define them, applied to the model's logits in float64."""
    out: list[int] = []
    for _ in range(steps):
        logits = forward(prompt + out)[0][-1].astype(np.float64)
        counts = np.bincount(out, minlength=logits.shape[0])
        seen = counts > 0
        seen[prompt] = True
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        logits = logits - counts * frequency - (counts > 0) * presence
        out.append(int(np.argmax(logits)))
        if out[-1] in stop_ids:
            break
    return out


def test_penalties_change_greedy_output_as_documented(server, forward):
    """A strong frequency penalty stops the greedy repetition; each penalty's output equals the reference's."""
    tok, client = server.engine.sampler.tokenizer, server.client()
    prompt, steps, stops = tok.encode("Numbers 0123456789"), 24, tok.stop_ids
    plain = greedy(forward, prompt, steps, stops)
    assert np.bincount(plain).max() >= 4, plain  # greedy repeats itself here
    for penalty in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 1.8},
        {"frequency_penalty": -0.5, "presence_penalty": 0.5, "repetition_penalty": 0.7},
    ):
        names = {"frequency_penalty": "frequency", "presence_penalty": "presence", "repetition_penalty": "repetition"}
        ref = greedy(forward, prompt, steps, stops, **{names[k]: v for k, v in penalty.items()})
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0, extra_body=penalty)
        assert choice_of(out).text == tok.decode([t for t in ref if t not in stops]), penalty
        if penalty == {"frequency_penalty": 2.0}:
            assert np.bincount(ref).max() < np.bincount(plain).max(), (plain, ref)
        assert ref != plain, penalty


def test_eval_settings_are_data_no_recompiles(server):
    """Requests with new penalties, logprob counts and echo reuse the compiled programs."""
    client = server.client()
    jitted = (
        sampler_lib._decode,
        sampler_lib.start,
        sampler_lib.insert,
        sampler_lib._prefill_chunk,
        sampler_lib._prefill_chunk_scored,
        sampler_lib._scores,
    )
    prompt = "JAX and Flax"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1)  # each path compiled
    before = [f._cache_size() for f in jitted]
    settings = [
        dict(temperature=0.7, seed=1, frequency_penalty=0.3, logprobs=5),
        dict(temperature=0.0, presence_penalty=-1.0, echo=True, logprobs=2, max_tokens=0),
        dict(temperature=1.0, seed=2, extra_body={"repetition_penalty": 1.3}, logprobs=20, echo=True),
        dict(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0, max_tokens=7),
    ]
    for s in settings:
        client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 5, **s})
    chat = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4, logprobs=True, top_logprobs=7)
    client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4, presence_penalty=0.9, logprobs=True)
    assert [f._cache_size() for f in jitted] == before


EVAL_BAD = [  # (path, body, param, words the message must contain)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs", ["at most 20", "--max-logprobs"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": -1}, "logprobs", ["greater than or equal"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, ["max_tokens", "echo"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", ["2"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": -3}, "presence_penalty", ["-2"]),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty", ["0"]),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        None,
        ["top_logprobs", "'logprobs': true"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
        "top_logprobs",
        ["at most 20"],
    ),
    ("/detokenize", {"tokens": [5, 10**6]}, "tokens", ["token ids"]),
    ("/tokenize", {"prompt": 5}, "prompt", ["string"]),
]


def test_bad_eval_values_get_400_naming_the_field(server):
    for path, body, param, words in EVAL_BAD:
        code, reply, _ = post(server.url + path, body)
        assert (code, reply["error"]["param"]) == (400, param), (body, reply)
        assert all(w in reply["error"]["message"] for w in words), (words, reply)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
        ({"prompt_logprobs": -1}, r"prompt_logprobs must be an integer in \[0, 20\]"),
        ({"max_tokens": -1}, "max_tokens must be an integer >= 0"),
        ({"frequency_penalty": 2.5}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"presence_penalty": float("nan")}, r"presence_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ],
)
def test_engine_refuses_bad_eval_settings(server, settings, match):
    """The engine's own check, for callers that build GenerationParams without the HTTP schema."""
    with pytest.raises(ValueError, match=match):
        server.engine.check([2, 5, 9], GenerationParams(**{"max_tokens": 4, **settings}))


def test_max_logprobs_flag():
    """--max-logprobs lowers the bound; above the compiled top-k width (20) it is refused when parsed."""
    from gemma_jax.serve.__main__ import build_parser
    from gemma_jax.serve.policy import Policy, from_args

    assert from_args(build_parser().parse_args(["--max-logprobs", "5"])).max_logprobs == 5
    assert Policy().max_logprobs == 20
    for bad in ("21", "0"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--max-logprobs", bad])
    with pytest.raises(ValueError, match="at most 20"):
        Policy(max_logprobs=21)


def test_tokenizer_endpoints(server):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, as lm-eval's remote tokenizer calls them."""
    tok = server.engine.sampler.tokenizer
    with urllib.request.urlopen(f"{server.url}/tokenizer_info") as r:
        info = json.loads(r.read())
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<bos>", "<eos>", CONTEXT)
    code, reply, _ = post(f"{server.url}/tokenize", {"prompt": TEXT, "add_special_tokens": False})
    assert code == 200 and reply["tokens"] == tok.encode(TEXT, add_bos=False) and reply["count"] == len(reply["tokens"])
    assert post(f"{server.url}/tokenize", {"prompt": "<eos>"})[1]["tokens"] == [tok.bos_id, tok.eos_id]
    assert post(f"{server.url}/detokenize", {"tokens": reply["tokens"]})[1] == {"prompt": TEXT}


def test_lm_eval_harness_local_completions(ckpt, server, forward, tmp_path):
    """`lm-eval run --model local-completions` against the server, on the local tasks of tests/data/lm_eval (a
    multiple_choice and a generate_until task, no hub): its tokenizer is the server's (vLLM's /tokenize, found by
    `tokenizer_backend=remote`), and each loglikelihood it reports equals the model's own summed logprobs of the
    same continuation within 1e-4; its generations are the greedy ones. Batches of 4 prompts per request, as
    `--batch_size 4` sends them. (The CLI's server is the same app: test_serve runs it.)"""
    pytest.importorskip("lm_eval")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    model_args = f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length={CONTEXT}"
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "gemma_jax_tiny_mc,gemma_jax_tiny_gen", "--include_path", str(TASKS),
         "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path / "out")],
        cwd=TASKS, env={**os.environ, **offline}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    tok = Tokenizer.from_dir(ckpt)
    (mc,) = (tmp_path / "out").glob("**/samples_gemma_jax_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in mc.read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        for request, ((loglikelihood, _),) in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = request["arg_0"], request["arg_1"]
            start = len(tok.encode(context, add_bos=False))  # lm-eval's split: the context's tokens come first
            ids = tok.encode(context + continuation, add_bos=False)  # its remote tokenizer adds no BOS
            expected = float(np.sum(expected_logprobs(lambda x: forward(x)[1], ids)[start - 1 :]))
            np.testing.assert_allclose(float(loglikelihood), expected, atol=1e-4)
    (gen,) = (tmp_path / "out").glob("**/samples_gemma_jax_tiny_gen_*.jsonl")
    samples = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        (request,), ((text,),) = sample["arguments"].values(), sample["resps"]
        (ref,) = server.engine.sampler.generate([tok.encode(request["arg_0"], add_bos=False)], max_new_tokens=8)
        assert text == ref.text.split("\n")[0], (text, ref.text)
