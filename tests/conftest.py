"""Shared fixtures: HF oracle models built from our configs, with weights random enough to matter."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
import urllib.request

# Tests run on the CPU with 8 virtual devices (sharding tests use them; others see device 0).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CLIs keep compiled programs in a persistent cache unless this is set; tests run the CLIs without one.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import jax
import numpy as np
import pytest

import gemma_jax as gj

# The longest modules (about a minute or more each), first: the two workers take modules in this order, so the
# short ones fill in at the end instead of one long module running alone after the other worker has finished.
LONGEST_FIRST = (
    "test_serve.py",
    "test_serve_engine.py",
    "test_notebooks.py",
    "test_real_model.py",
    "test_readme.py",
    "test_serve_eval.py",
    "test_sharding.py",
    "test_kv_cache_8bit.py",
    "test_sppo_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every jit cache after each test module.

    Each XLA:CPU executable keeps memory maps of its code, and the suite compiles thousands of programs in one
    process (the server tests alone peak at 16,887 maps): past the kernel's `vm.max_map_count` (65,530 here) the
    next compile segfaulted. Freed programs release their maps; a module's own no-recompile checks are unaffected.
    """
    yield
    jax.clear_caches()
    gc.collect()


def hf_model(config: gj.GemmaConfig, seed: int = 0):
    """A float32 eager-attention HF `Gemma2ForCausalLM` (or `Gemma3ForCausalLM`) with random weights, norms included.

    HF's default init (std 0.02, zero norms) gives near-zero logits that would pass any tolerance;
    larger weights push scores past the softcaps and make every term count.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if config.model_type == "gemma3_text":
        config_cls, model_cls = transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM
    else:
        config_cls, model_cls = transformers.Gemma2Config, transformers.Gemma2ForCausalLM
    model = model_cls(config_cls(**config.to_hf(), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else (0.5 if "embed" in name else 0.15)
            p.normal_(0.0, std)
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None):
    import torch

    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask.astype(np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions.astype(np.int64))
    with torch.no_grad():
        return model(torch.as_tensor(tokens.astype(np.int64)), **kwargs).logits.float().numpy()


def left_padded(rng: np.random.Generator, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token rows of the given lengths, left-padded with id 0 to the longest; returns (tokens, mask)."""
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(1, vocab, n)
        mask[i, t - n :] = True
    return tokens, mask


_TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. Hello world! How are you today?
Gemma is a family of lightweight open models; JAX and Flax make TPUs easy to use.
def main():\n    return 42\n\tindented with a tab
Numbers 0123456789 and punctuation: ,.;:!?()[]{}<>-_=+*/\\'"
你好，世界。日本語のテキスト。한국어 텍스트. Ünïcödé àccents café naïve."""


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A `gemma_jax.tokenizer.Tokenizer` over a 480-piece sentencepiece model built like Gemma's.

    BPE with byte fallback, no dummy prefix, no whitespace normalization, and the Gemma special
    tokens at their Gemma ids (pad 0, eos 1, bos 2, unk 3, <start_of_turn> 106, <end_of_turn> 107);
    fits `gemma2_tiny()` (vocab 512). The model file is `tiny_tokenizer.model_file`.
    """
    from gemma_jax.tokenizer import train

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    return train(path, _TOKENIZER_TEXT.splitlines() * 20, vocab_size=480)


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """A gemma_jax cache holding the embedded default model (Gemma 3 270M), converted once per test session."""
    from gemma_jax import default_model

    pytest.importorskip(default_model.MODULE)
    pytest.importorskip("gguf")
    cache = tmp_path_factory.mktemp("gemma_jax_cache")
    default_model.ensure(cache, progress=False)
    return cache


def start_server(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300):
    """`python -m gemma_jax.serve ARGS` on a free port, returned once /health answers: (process, base url).
    Output goes to the process's stdout pipe; a server that exits or never answers fails with it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gemma_jax.serve", *args, "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()[0]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health").status == 200:
                return proc, url
        time.sleep(0.2)
