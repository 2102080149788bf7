"""Gemma's sentencepiece tokenizer, its chat template, and a streaming detokenizer.

Gemma's `tokenizer.model` is a BPE model with byte fallback and no dummy prefix, so
`sentencepiece` gives HF's ids directly; we add what HF adds on top: BOS, control tokens written
in the text (`<bos>`, `<eos>`, `<pad>`) read as single ids, and the stop ids of the generation config.

A checkpoint's tokenizer also knows whether the model is instruction-tuned (`is_instruction_tuned`):
only those were trained on the chat template; a base model continues text and rambles when chatted with.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
# Where HF checkpoints keep a chat template: tokenizer_config.json's "chat_template", or (newer) files of its own.
# A GGUF's `tokenizer.chat_template` is written to tokenizer_config.json when it is converted (gguf.write_tokenizer).
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# A model card's name marks the kind: gemma-2-9b-it, Gemma-2-9B-It-SPPO-Iter2, gemma-3-1b-it-Q4_K_M.gguf; gemma-3-1b-pt.
_IT_NAME = re.compile(r"(^|[-_. ])it($|[-_. ])", re.IGNORECASE)
_BASE_NAME = re.compile(r"(^|[-_. ])pt($|[-_. ])", re.IGNORECASE)
# Gemma's pieces after pad/eos/bos/unk: <mask> 4, <unused0..100> 5..105, <start_of_turn> 106, <end_of_turn> 107.
GEMMA_USER_SYMBOLS = ("<mask>", *(f"<unused{i}>" for i in range(101)), START_OF_TURN, END_OF_TURN)


class Tokenizer:
    """A sentencepiece model plus Gemma's special ids.

    `stop_ids` end generation; by default `<eos>` and, when the vocabulary has it, `<end_of_turn>`
    (what the -it checkpoints' generation_config.json lists). `from_dir` reads them from there.
    `instruction_tuned` False makes the chat template warn once (a base model was not trained on it);
    a bare model file says nothing about the model, so it defaults to True; `from_dir` detects it.
    """

    def __init__(
        self, model_file: str | os.PathLike, *, stop_ids: Iterable[int] | None = None, instruction_tuned: bool = True
    ):
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
        self.instruction_tuned = instruction_tuned
        self._warned_base = False
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in stop_ids))
        if not self.stop_ids or any(not 0 <= i < self.vocab_size for i in self.stop_ids):
            raise ValueError(f"stop_ids {self.stop_ids} must be a non-empty list of ids below {self.vocab_size}")
        # Control pieces never come out of sp.encode; HF reads them as special tokens when they appear in text.
        controls = [self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)]
        self._control_ids = {p: self._sp.piece_to_id(p) for p in controls}
        pattern = "|".join(re.escape(p) for p in sorted(controls, key=len, reverse=True))
        self._control_re = re.compile(f"({pattern})") if pattern else None

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike, *, instruction_tuned: bool | None = None) -> Tokenizer:
        """The tokenizer of a checkpoint directory; stop ids from its generation_config.json when present.

        `instruction_tuned` None detects it (`is_instruction_tuned`); True or False overrides the detection.
        """
        ckpt_dir = pathlib.Path(ckpt_dir)
        model_file = ckpt_dir / TOKENIZER_FILE
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{str(ckpt_dir)!r} has no {TOKENIZER_FILE}: copy the HF checkpoint's tokenizer.model next to it"
            )
        if instruction_tuned is None:
            instruction_tuned = is_instruction_tuned(ckpt_dir)
        stop_ids = _generation_stop_ids(ckpt_dir / "generation_config.json")
        return cls(model_file, stop_ids=stop_ids, instruction_tuned=instruction_tuned)

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

    def piece(self, token: int) -> str:
        """The vocabulary entry of one id, as the model file spells it (e.g. "<eos>", "▁the", "<0x0A>")."""
        return self._sp.id_to_piece(int(token))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS, pad) decode to nothing, bytes are reassembled.

        Ids past the tokenizer's vocabulary (a model's embedding may be padded beyond it) decode to nothing.
        """
        return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Gemma's chat template: `<bos><start_of_turn>user\\n{text}<end_of_turn>\\n...<start_of_turn>model\\n`.

        Character for character Gemma 3's released template (tests/data/gemma3_chat_template.jinja): roles
        alternate user/assistant starting with user, each turn's content is stripped, and a leading system
        message is folded, unstripped, into the first user turn (`system + "\\n\\n" + user`). Gemma 2's
        template renders the same text but rejects a system role. Where the released template would
        render something no model was trained on (an unknown role, a system message with no user turn
        after it) we refuse instead. On a base model this warns once: it was not trained on the template.
        """
        if not self.instruction_tuned and not self._warned_base:
            self._warned_base = True
            warnings.warn(
                f"{self.model_file.parent} holds a base (pretrained) model, not an instruction-tuned one: it was "
                "not trained on the chat template, so what it generates after a chat prompt rambles; complete "
                "plain text instead (chat=False), or use an instruction-tuned (-it) checkpoint",
                UserWarning,
                stacklevel=2,
            )
        prefix, messages = _split_system(messages)
        parts = ["<bos>"]
        for i, message in enumerate(messages):
            role = _ROLES.get(message.get("role", ""))
            if role is None:
                raise ValueError(f"message {i} has role {message.get('role')!r}; expected user, assistant or system")
            if (role == "user") != (i % 2 == 0):
                raise ValueError("conversation roles must alternate user/assistant/user/... starting with user")
            opening = prefix if i == 0 else ""
            parts.append(f"{START_OF_TURN}{role}\n{opening}{message['content'].strip()}{END_OF_TURN}\n")
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


def _split_system(messages: Sequence[Mapping[str, str]]) -> tuple[str, list[Mapping[str, str]]]:
    """(text that opens the first user turn, the turns): a leading system message becomes `system + "\\n\\n"`.

    As in the released template, the system text is kept as written; only each turn's own content is stripped.
    """
    messages = list(messages)
    if not messages:
        raise ValueError("messages is empty: pass at least one user message")
    if messages[0].get("role") != "system":
        return "", messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    return f"{messages[0]['content']}\n\n", messages[1:]


def is_instruction_tuned(ckpt_dir: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds an instruction-tuned model, so chat gets the template by default.

    The model card's name decides first: `-it` (gemma-2-9b-it, Gemma-2-9B-It-SPPO-Iter2) is instruction-tuned,
    `-pt` (gemma-3-1b-pt) is base. The names are the checkpoint's recorded source (gemma_jax.json) and the
    directory's. Otherwise a chat template among the tokenizer files (tokenizer_config.json, chat_template.jinja,
    .json; a GGUF's `tokenizer.chat_template` lands in tokenizer_config.json) marks an instruction-tuned model.
    """
    from gemma_jax.checkpoint import METADATA_FILE  # here: the tokenizer alone needs no JAX

    ckpt_dir = pathlib.Path(ckpt_dir)
    names = [ckpt_dir.name]
    if (ckpt_dir / METADATA_FILE).is_file():
        source = json.loads((ckpt_dir / METADATA_FILE).read_text(encoding="utf-8")).get("source") or ""
        names.append(pathlib.PurePath(source).name)  # a hub id's repo name, a local path's last component
    for pattern, tuned in ((_IT_NAME, True), (_BASE_NAME, False)):
        if any(pattern.search(name) for name in names):
            return tuned
    if any((ckpt_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = ckpt_dir / TOKENIZER_CONFIG
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def _generation_stop_ids(path: pathlib.Path) -> list[int] | None:
    """`eos_token_id` (an int or a list) of an HF generation_config.json; None if absent."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)
