"""Gemma's sentencepiece tokenizer, its chat template, and a streaming detokenizer.

Gemma's `tokenizer.model` is a BPE model with byte fallback and no dummy prefix, so
`sentencepiece` gives HF's ids directly; we add what HF adds on top: BOS, control tokens written
in the text (`<bos>`, `<eos>`, `<pad>`) read as single ids, and the stop ids of the generation config.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
# Gemma's pieces after pad/eos/bos/unk: <mask> 4, <unused0..100> 5..105, <start_of_turn> 106, <end_of_turn> 107.
GEMMA_USER_SYMBOLS = ("<mask>", *(f"<unused{i}>" for i in range(101)), START_OF_TURN, END_OF_TURN)


class Tokenizer:
    """A sentencepiece model plus Gemma's special ids.

    `stop_ids` end generation; by default `<eos>` and, when the vocabulary has it, `<end_of_turn>`
    (what the -it checkpoints' generation_config.json lists). `from_dir` reads them from there.
    """

    def __init__(self, model_file: str | os.PathLike, *, stop_ids: Iterable[int] | None = None):
        path = pathlib.Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {str(path)!r}: pass the checkpoint's {TOKENIZER_FILE}")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        if stop_ids is None:
            end_of_turn = self._sp.piece_to_id(END_OF_TURN)
            stop_ids = [self.eos_id] + ([end_of_turn] if end_of_turn != self._sp.unk_id() else [])
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in stop_ids))
        if not self.stop_ids or any(not 0 <= i < self.vocab_size for i in self.stop_ids):
            raise ValueError(f"stop_ids {self.stop_ids} must be a non-empty list of ids below {self.vocab_size}")
        # Control pieces never come out of sp.encode; HF reads them as special tokens when they appear in text.
        controls = [self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)]
        self._control_ids = {p: self._sp.piece_to_id(p) for p in controls}
        pattern = "|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True))
        self._control_re = re.compile(f"({pattern})") if pattern else None

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a checkpoint directory; stop ids from its generation_config.json when present."""
        ckpt_dir = pathlib.Path(ckpt_dir)
        model_file = ckpt_dir / TOKENIZER_FILE
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{str(ckpt_dir)!r} has no {TOKENIZER_FILE}: copy the HF checkpoint's tokenizer.model next to it"
            )
        return cls(model_file, stop_ids=_generation_stop_ids(ckpt_dir / "generation_config.json"))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first unless `add_bos=False`."""
        ids = [self.bos_id] if add_bos else []
        parts = self._control_re.split(text) if self._control_re else [text]
        for i, part in enumerate(parts):
            if i % 2:  # the regex group: a control token written in the text
                ids.append(self._control_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS, pad) decode to nothing, bytes are reassembled.

        Ids past the tokenizer's vocabulary (a model's embedding may be padded beyond it) decode to nothing.
        """
        return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Gemma-2's chat template: `<bos><start_of_turn>user\\n{text}<end_of_turn>\\n...<start_of_turn>model\\n`.

        Roles must alternate user/assistant starting with user, and content is stripped, as in the
        released template. That template rejects a system role; we fold a leading system message
        into the first user turn (system text, a blank line, user text), as Gemma 3's template does.
        """
        messages = _fold_system(messages)
        parts = ["<bos>"]
        for i, message in enumerate(messages):
            role = _ROLES.get(message.get("role", ""))
            if role is None:
                raise ValueError(f"message {i} has role {message.get('role')!r}; expected user, assistant or system")
            if (role == "user") != (i % 2 == 0):
                raise ValueError("conversation roles must alternate user/assistant/user/... starting with user")
            parts.append(f"{START_OF_TURN}{role}\n{message['content'].strip()}{END_OF_TURN}\n")
        if add_generation_prompt:
            parts.append(f"{START_OF_TURN}model\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat template (its `<bos>` included)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving in pieces into text pieces whose concatenation is `decode(all ids)`.

    A character split across byte-fallback tokens is held back until its last byte arrives: the
    text of the new ids is only emitted when it does not end in U+FFFD (an incomplete UTF-8 sequence).
    The new ids are decoded together with the previous piece, so joins between pieces come out right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids decoded as context
        self._read = 0  # ids before this were emitted

    def push(self, ids: Iterable[int]) -> str:
        """Add ids; return the text that is now complete (possibly empty)."""
        self._ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (e.g. a dangling partial character) at the end of the stream."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self._ids) == self._read:
            return ""
        decode = self._tokenizer.decode
        text = decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") and not final:
            return ""
        before = decode(self._ids[self._prefix : self._read])
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]


def train(path: str | os.PathLike, sentences: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a sentencepiece model laid out like Gemma's at `path`, for random-weight models and tests.

    BPE with byte fallback (any text encodes), no dummy prefix, no whitespace normalization, and
    the special tokens at Gemma's ids (pad 0, eos 1, bos 2, unk 3, <start_of_turn> 106, <end_of_turn> 107).
    """
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=f,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus may support fewer pieces
            byte_fallback=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=list(GEMMA_USER_SYMBOLS),
            minloglevel=2,
        )
    return Tokenizer(path)


def _fold_system(messages: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    messages = list(messages)
    if not messages:
        raise ValueError("messages is empty: pass at least one user message")
    if messages[0].get("role") != "system":
        return messages
    system, rest = messages[0]["content"].strip(), messages[1:]
    if not rest or rest[0].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    return [{"role": "user", "content": f"{system}\n\n{rest[0]['content'].strip()}"}, *rest[1:]]


def _generation_stop_ids(path: pathlib.Path) -> list[int] | None:
    """`eos_token_id` (an int or a list) of an HF generation_config.json; None if absent."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)
