"""Every Python block of README.md runs as written, so the README cannot drift from the code.

Blocks run in this process on what they name: tiny configs, the embedded default model (converted
once per session), a checkpoint built here at ~/ckpt/sppo-iter2 (HOME is a temporary directory), and
the default model served by `python -m gemma_jax.serve` for the OpenAI client. A block that needs
what a test cannot have (a hub download, an accelerator) is marked in the README with
`<!-- not run by tests/test_readme.py: REASON -->` on the line above it, and is skipped with that reason.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
from conftest import start_server

import gemma_jax as gj
from gemma_jax import checkpoint

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- not run by tests/test_readme.py: "
BLOCK = re.compile(
    rf"(?:{re.escape(SKIP)}(?P<reason>.+?) -->\n)?```python\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE
)


def readme_blocks() -> list:
    text = README.read_text(encoding="utf-8")
    params = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        marks = [pytest.mark.skip(reason=m["reason"])] if m["reason"] else []
        params.append(pytest.param(m["code"], line, marks=marks, id=f"README.md:{line}"))
    return params


BLOCKS = readme_blocks()


def test_the_readme_has_blocks_that_run():
    assert len(BLOCKS) >= 5 and sum(not b.marks for b in BLOCKS) >= 4
    assert README.read_text(encoding="utf-8").count("```python") == len(BLOCKS)  # none escapes the pattern


def test_installs_are_from_the_clone():
    """gemma-jax is not on PyPI: every install of it in the README is an editable one of the clone."""
    installs = re.findall(r"pip install [^\n`]*", README.read_text(encoding="utf-8"))
    assert installs and all(re.search(r"-e \"\.\[[\w,]+\]\"", line) for line in installs), installs


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_tokenizer):
    """An empty HOME, but for the checkpoint the README loads from ~/ckpt/sppo-iter2 (tiny, random weights)."""
    from flax import nnx

    home = tmp_path_factory.mktemp("home")
    config = gj.gemma2_tiny()
    model = gj.Transformer(config, rngs=nnx.Rngs(0))
    tokenizer_dir = home / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.model").write_bytes(tiny_tokenizer.model_file.read_bytes())
    checkpoint.save(home / "ckpt" / "sppo-iter2", config, gj.params_of(model), tokenizer_dir=tokenizer_dir)
    return home


@pytest.fixture(scope="module")
def server(home, default_model_cache):
    """`python -m gemma_jax.serve` with no --checkpoint (the default model), small, on a free port."""
    env = {**os.environ, "HOME": str(home), "GEMMA_JAX_CACHE": str(default_model_cache), "JAX_PLATFORMS": "cpu"}
    proc, url = start_server(["--slots", "1", "--cache-length", "128"], env=env)
    yield url
    proc.terminate()
    proc.wait(60)


@pytest.mark.parametrize("code, line", BLOCKS)
def test_readme_block_runs_as_written(code, line, home, default_model_cache, monkeypatch, request):
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GEMMA_JAX_CACHE", str(default_model_cache))
    if "OpenAI()" in code:  # the client reads its server from the environment, as the README exports it
        monkeypatch.setenv("OPENAI_BASE_URL", request.getfixturevalue("server") + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "unused")
    exec(compile(code, f"{README}:{line}", "exec"), {"__name__": "__readme__"})
