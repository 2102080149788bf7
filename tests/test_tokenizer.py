"""Tokenizer: ids equal HF's GemmaTokenizer on the same model, Gemma's chat template, streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest

from gemma_jax.tokenizer import Tokenizer

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


def test_chat_template_matches_gemma(tiny_tokenizer, hf_tokenizer):
    """Our rendering equals the released Gemma-2 template (run by HF's jinja engine) on a valid chat."""
    template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    )
    chat = [
        {"role": "user", "content": "  Hi!\n"},
        {"role": "assistant", "content": "Hello. 🙂"},
        {"role": "user", "content": "你好"},
    ]
    for gen in (True, False):
        ours = tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=gen)
        theirs = hf_tokenizer.apply_chat_template(
            chat, chat_template=template, add_generation_prompt=gen, tokenize=False
        )
        assert ours == theirs
    ids = tiny_tokenizer.encode_chat(chat)
    tail = tiny_tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n", add_bos=False)
    assert ids[:2] == [2, 106] and ids[-len(tail) :] == tail and tail[0] == 107
    assert ids == hf_tokenizer.encode(tiny_tokenizer.apply_chat_template(chat), add_special_tokens=False)


def test_system_folded_into_first_user_turn(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Why?"}]
    )
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"role": "system", "content": "x"}], "followed by a user"),
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
