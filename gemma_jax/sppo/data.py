"""Rows in and out (JSONL, parquet, HF datasets) and the reference's tokenization of preference pairs.

Tokenization (`SPPOTrainer.tokenize_row` with the alignment-handbook chat template), two modes:
- clean (default): prompt = chat template of the user turn with the generation header, one BOS;
  response = the response text then `<end_of_turn>`, i.e. exactly the tokens the policy sampled
  before stopping. The log-ratio covers only what the policy generated.
- reference_compat: the released runs' quirks. The prompt template has no generation header (the
  handbook's `add_generate_prompt` typo), so the response is `<start_of_turn>model\\n{text}<end_of_turn>\\n`
  then `<eos>`, header scored; and BOS is prepended to a template that already starts with `<bos>`.
Truncation (both modes, TRL's rules): if prompt + longer response > max_length, keep the last
max_prompt_length prompt tokens; if still too long, cut both responses to max_length - max_prompt_length.
The clean mode keeps its BOS when it cuts the prompt; the reference drops it with the cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import pathlib
import reprlib
import tempfile
from collections.abc import Sequence

import numpy as np

from gemma_jax.sppo.preference import COLUMNS
from gemma_jax.tokenizer import END_OF_TURN, Tokenizer

PROB_COLUMNS = COLUMNS[2:]


# ---------------------------------------------------------------- files


class Rows(list):
    """Rows of a file that remember where each came from, so an error names the file and the line."""

    def __init__(self, rows: Sequence[dict], source: str, lines: Sequence[int] | None = None):
        super().__init__(rows)
        self.source, self.lines = source, lines

    def where(self, i: int) -> str:
        return f"{self.source}, line {self.lines[i]}" if self.lines is not None else f"{self.source}, row {i}"


def where(rows: Sequence[dict], i: int, source: str) -> str:
    """Row `i` as a user finds it: file and line for rows read from JSONL, else its index."""
    return rows.where(i) if isinstance(rows, Rows) else f"{source}, row {i}"


def read_rows(path: str | os.PathLike) -> Rows:
    """All rows of a .jsonl or .parquet file as dicts; unreadable input is named by file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {str(path)!r}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        pa = _pyarrow()
        try:
            table = pa.parquet.read_table(path)
        except pa.ArrowException as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        return Rows(table.to_pylist(), str(path))
    raise ValueError(f"{str(path)!r}: expected a .jsonl or .parquet file")


def _read_jsonl(path: pathlib.Path) -> Rows:
    rows, lines = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 text (byte {e.start + 1}); is it a binary file? "
                    "Expected JSON Lines: one JSON object per line"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}, column {e.colno}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object (one row), got {type(row).__name__}")
            rows.append(row)
            lines.append(number)
    return Rows(rows, str(path), lines)


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> pathlib.Path:
    """Write rows to .jsonl or .parquet atomically (a temp file renamed into place)."""
    path = pathlib.Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{str(path)!r}: output must end in .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            pa = _pyarrow()
            pa.parquet.write_table(pa.Table.from_pylist(list(rows)), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("parquet files need pyarrow: pip install 'gemma-jax[sppo]'") from e
    return pyarrow


def require_columns(rows: Sequence[dict], columns: Sequence[str], source: str) -> None:
    """Fail before any work when a row lacks a column, naming it and the columns that are there."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{where(rows, i, source)}: no column {missing[0]!r} (columns: {sorted(row)})")


def check_pairs(rows: Sequence[dict], source: str = "data") -> None:
    """Every row a preference pair, before any tokenizing or training: `chosen` holds a user and an
    assistant message, `rejected` an assistant one, each content a string, and each probability a
    finite number in [0, 1] (a NaN here would train to NaN weights). Names file, line and column."""
    require_columns(rows, COLUMNS, source)
    for i, row in enumerate(rows):
        at = where(rows, i, source)
        for column, roles in (("chosen", ("user", "assistant")), ("rejected", ("assistant",))):
            _check_conversation(row[column], roles, f"{at}, column {column!r}")
        for column in PROB_COLUMNS:
            value = row[column]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"{at}, column {column!r}: expected a probability in [0, 1], got {value!r}")


def _check_conversation(conversation: object, roles: Sequence[str], at: str) -> None:
    if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
        raise ValueError(
            f"{at}: expected a list of messages [{{'role': 'user', 'content': ...}}, "
            f"{{'role': 'assistant', 'content': ...}}], got {reprlib.repr(conversation)}"
        )
    for role in roles:
        message = next((m for m in conversation if m.get("role") == role), None)
        if message is None:
            raise ValueError(f"{at}: no {role!r} message in {reprlib.repr(conversation)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{at}: the {role!r} message's content must be a string, got {message.get('content')!r}")


def load_prompts(source: str, *, column: str = "prompt", split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts from a .jsonl/.parquet file or an HF datasets id (e.g. UCLA-AGI/data-mistral-7b-instruct-sppo-iter1)."""
    if os.path.exists(source):
        rows = read_rows(source)
    else:
        try:
            import datasets
        except ImportError as e:
            raise ValueError(
                f"{source!r} is not a file; to read it as an HF dataset id install datasets: "
                "pip install 'gemma-jax[sppo]'"
            ) from e
        rows = datasets.load_dataset(source, split=split).to_list()
    rows = rows[:limit] if limit is not None else rows
    require_columns(rows, [column], source)
    return [str(row[column]) for row in rows]


# ---------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one training pair; the responses are scored, the prompt is not."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool


def message_text(conversation: Sequence[dict], role: str) -> str:
    """Content of the first message with `role` in a [user, assistant] list (the reference's columns)."""
    for message in conversation:
        if message.get("role") == role:
            return message["content"]
    raise ValueError(f"conversation {conversation!r} has no {role!r} message")


def tokenize_pair(
    tokenizer: Tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    reference_compat: bool = False,
) -> TokenizedPair:
    """The reference's `tokenize_row` (see the module docstring for the two modes)."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    user = [{"role": "user", "content": prompt}]
    if reference_compat:
        prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=False)
        prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt_text, add_bos=False)]

        def response_ids(text: str) -> list[int]:
            full = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": text}], add_generation_prompt=False
            )
            return [*tokenizer.encode(full[len(prompt_text) :], add_bos=False), tokenizer.eos_id]

    else:
        prompt_ids = tokenizer.encode_chat(user, add_generation_prompt=True)

        def response_ids(text: str) -> list[int]:
            return tokenizer.encode(text.strip() + END_OF_TURN, add_bos=False)

    chosen_ids, rejected_ids = response_ids(chosen), response_ids(rejected)
    longer = max(len(chosen_ids), len(rejected_ids))
    truncated = len(prompt_ids) + longer > max_length
    if truncated:
        if reference_compat:
            prompt_ids = prompt_ids[-max_prompt_length:]
        else:
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]  # BOS + the end
        if len(prompt_ids) + longer > max_length:
            cut = max_length - max_prompt_length
            chosen_ids, rejected_ids = chosen_ids[:cut], rejected_ids[:cut]
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, truncated)


# ---------------------------------------------------------------- arrays


@dataclasses.dataclass(frozen=True)
class PairDataset:
    """Tokenized pairs plus their preference columns, ready to be cut into padded batches."""

    pairs: list[TokenizedPair]
    probs: np.ndarray  # [N, 3] float32: chosen_probs, chosen_probs_win, chosen_probs_lose

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_truncated(self) -> int:
        return sum(p.truncated for p in self.pairs)

    def fingerprint(self) -> str:
        """A hash of every token id and probability: ties a run directory to the data it was made from."""
        h = hashlib.sha256()
        for p in self.pairs:
            for ids in (p.prompt, p.chosen, p.rejected):
                h.update(np.asarray(ids, np.int64).tobytes() + b"|")
        h.update(self.probs.tobytes())
        return h.hexdigest()[:16]


def build_dataset(
    rows: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    reference_compat: bool = False,
    source: str = "data",
) -> PairDataset:
    """Tokenize rows with the reference's columns (chosen/rejected as [user, assistant] message lists)."""
    check_pairs(rows, source)
    pairs = [
        tokenize_pair(
            tokenizer,
            message_text(row["chosen"], "user"),
            message_text(row["chosen"], "assistant"),
            message_text(row["rejected"], "assistant"),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            reference_compat=reference_compat,
        )
        for row in rows
    ]
    probs = np.asarray([[row[c] for c in PROB_COLUMNS] for row in rows], np.float32)
    return PairDataset(pairs, probs)


def bucket_length(n: int, max_length: int, multiple: int = 64) -> int:
    """Pad lengths round up to a multiple (bounded recompiles), never past max_length."""
    return min(-(-n // multiple) * multiple, max_length)


def pair_batch(dataset: PairDataset, indices: np.ndarray, *, max_length: int) -> dict[str, np.ndarray]:
    """Right-padded arrays for the pairs `indices` [B]; chosen rows first, then rejected: [2B, T].

    tokens [2B, T] int32, mask [2B, T] (False on padding), loss_mask [2B, T] (True on response
    tokens), probs [B, 3] float32.
    """
    seqs, starts = [], []
    for i in indices:
        p = dataset.pairs[int(i)]
        seqs.append(p.prompt + p.chosen)
        starts.append(len(p.prompt))
    for i in indices:
        p = dataset.pairs[int(i)]
        seqs.append(p.prompt + p.rejected)
        starts.append(len(p.prompt))
    t = bucket_length(max(len(s) for s in seqs), max_length)
    tokens = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), bool)
    loss_mask = np.zeros((len(seqs), t), bool)
    for r, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        tokens[r, : len(seq)] = seq
        mask[r, : len(seq)] = True
        loss_mask[r, start : len(seq)] = True
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "probs": dataset.probs[np.asarray(indices)]}
