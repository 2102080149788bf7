"""`python -m gemma_jax.sample` end to end on a tiny HF checkpoint (converted on first use), and its errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import hf_model

import gemma_jax as gj
from gemma_jax import sample

CONFIG = gj.gemma2_tiny(sliding_window=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    """An HF checkpoint as `save_pretrained` writes it, plus the test tokenizer; its greedy oracle."""
    import torch

    model = hf_model(CONFIG, seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.05)  # varied greedy text (see test_sampler)
    d = tmp_path_factory.mktemp("hf_ckpt")
    model.save_pretrained(d)
    shutil.copy(tiny_tokenizer.model_file, d / "tokenizer.model")
    return d, model


@pytest.fixture(autouse=True)
def single_process(monkeypatch, request):
    """In-process runs skip the multi-host join: JAX is already initialized in this pytest process.
    The subprocess test runs the real CLI start-up, join attempt included."""
    if "subprocess" not in request.node.name:
        monkeypatch.setattr(sample.sharding, "maybe_initialize_distributed", lambda *a: False)


def run(capsys, *argv, input_fn=input):
    code = sample.main([str(a) for a in argv], input_fn=input_fn)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("converted")


def test_subprocess_json_batch_matches_hf(hf_dir, cache_dir, tiny_tokenizer):
    """`python -m gemma_jax.sample` converts the HF directory, samples a batch greedily, prints JSON lines."""
    import torch

    path, hf = hf_dir
    prompts = ["Hello world", "你好 🙂"]
    argv = ["--checkpoint", path, "--cache-dir", cache_dir, "--dtype", "float32", "--cache-length", 96,
            "--max-new-tokens", 6, "--json", *(a for p in prompts for a in ("--prompt", p))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the CLI's own: <cache>/xla
    env |= {"JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # tiny programs count too
    proc = subprocess.run(
        [sys.executable, "-m", "gemma_jax.sample", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tiny_tokenizer.encode(prompt)  # not an -it checkpoint: no chat template by default
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, eos_token_id=[1, 107])
        ref = ref[0, len(ids) :].tolist()
        if row["finish_reason"] == "stop":
            ref = ref[:-1]
        assert row["token_ids"] == ref
        assert row["text"] == tiny_tokenizer.decode(ref)
    assert len([p for p in cache_dir.iterdir() if p.name != "xla"]) == 1  # converted once
    assert any((cache_dir / "xla").iterdir())  # compiled programs kept for the next run


def test_stream_and_chat_template(capsys, hf_dir, cache_dir):
    path, _ = hf_dir
    common = ("--checkpoint", path, "--cache-dir", cache_dir, "--dtype", "float32", "--cache-length", 96)
    _, streamed = run(capsys, *common, "--max-new-tokens", 8, "--prompt", "Hi", "--chat")
    _, batched = run(capsys, *common, "--max-new-tokens", 8, "--prompt", "Hi", "--chat", "--json")
    assert streamed.out == json.loads(batched.out)["text"] + "\n"


def test_chat_repl_keeps_history(capsys, hf_dir, cache_dir, monkeypatch):
    path, _ = hf_dir
    calls = spy_stream(monkeypatch)
    user = typed("Hello", "And then?", "/reset", "Hi")
    code, out = run(capsys, "--checkpoint", path, "--cache-dir", cache_dir, "--dtype", "float32", "--chat",
                    "--cache-length", 96, "--max-new-tokens", 4, input_fn=user)  # fmt: skip
    seen = [list(prompt) for prompt, _ in calls]
    assert code == 0 and len(seen) == 3
    assert seen[1][: len(seen[0])] == seen[0]  # the second turn's prompt extends the first conversation
    assert np.count_nonzero(np.asarray(seen[1]) == 106) == 4  # user, model, user, model turns
    assert out.out.startswith(sample.CHAT_BANNER) and "History cleared.\n" in out.out
    assert np.count_nonzero(np.asarray(seen[2]) == 106) == 2  # after /reset: a new conversation


def test_base_model_repl_completes_each_line(capsys, hf_dir, cache_dir, monkeypatch):
    """No chat template, no -it: each line is a plain prompt, no history; the loop says so in one line."""
    path, _ = hf_dir
    seen = spy_stream(monkeypatch)
    user = typed("Hello", "/reset", "world")
    code, out = run(capsys, "--checkpoint", path, "--cache-dir", cache_dir, "--dtype", "float32",
                    "--cache-length", 96, "--max-new-tokens", 4, input_fn=user)  # fmt: skip
    assert code == 0 and [prompt for prompt, _ in seen] == ["Hello", "world"]
    assert all(not kw.get("chat") for _, kw in seen)
    assert out.out.startswith(sample.COMPLETION_BANNER) and sample.COMPLETION_BANNER.count("\n") == 1
    assert "Nothing to clear" in out.out
    assert not out.err  # no base-model warning: the template is not used


def test_chat_is_on_by_default_only_for_an_instruction_tuned_checkpoint(
    capsys, hf_dir, cache_dir, tmp_path, monkeypatch
):
    path, _ = hf_dir
    it_dir = tmp_path / "hf_with_template"  # an -it checkpoint's tokenizer_config.json holds its chat template
    shutil.copytree(path, it_dir)
    (it_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    seen = spy_stream(monkeypatch)
    for source in (path, it_dir):
        run(capsys, "--checkpoint", source, "--cache-dir", cache_dir, "--dtype", "float32", "--cache-length", 96,
            "--max-new-tokens", 2, "--prompt", "Hi")  # fmt: skip
    assert [kw["chat"] for _, kw in seen] == [False, True]


def test_help_shows_every_default():
    parser = sample.build_parser()
    text = " ".join(parser.format_help().split())
    assert f"(default: {sample.MAX_NEW_TOKENS})" in text and f"(default: {sample.CACHE_LENGTH})" in text
    for action in parser._actions:
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text or "default" in action.help, action.option_strings


def typed(*lines):
    """An input() that returns `lines`, then raises EOFError (Ctrl-D)."""
    it = iter(lines)

    def user(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return user


def spy_stream(monkeypatch) -> list:
    """Record (prompt, keywords) of each Sampler.stream call, which then runs as usual."""
    seen = []
    original = sample.Sampler.stream

    def spy(self, prompt, **kw):
        seen.append((prompt, kw))
        return original(self, prompt, **kw)

    monkeypatch.setattr(sample.Sampler, "stream", spy)
    return seen


@pytest.mark.parametrize(
    "args, match",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x" * 40, "--cache-length", "16"], "cache_length is 16"),
    ],
)
def test_bad_arguments(capsys, hf_dir, cache_dir, args, match):
    path, _ = hf_dir
    with pytest.raises(SystemExit) as e:
        run(capsys, "--checkpoint", path, "--cache-dir", cache_dir, "--dtype", "float32", *args)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit) as e:
        run(capsys, "--checkpoint", tmp_path, "--cache-dir", tmp_path / "cache", "--prompt", "hi")
    assert e.value.code == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_chat_repl_ctrl_c_stops_one_answer(tiny_tokenizer):
    """Ctrl-C while an answer streams ends that answer; the chat goes on with the shown part as history."""
    import io

    prompts = []

    class Interrupted:
        tokenizer = tiny_tokenizer

        def stream(self, ids, **kw):
            prompts.append(ids)
            yield "partial"
            raise KeyboardInterrupt

    lines = iter(["first", "second", "/exit"])
    out = io.StringIO()
    sample.repl(Interrupted(), chat=True, input_fn=lambda _: next(lines), out=out, seed=0, max_new_tokens=4)
    assert out.getvalue().count("partial [interrupted]") == 2
    second = tiny_tokenizer.decode(prompts[1])
    assert "first" in second and "partial" in second and "second" in second
