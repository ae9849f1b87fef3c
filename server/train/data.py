"""Training data: JSON Lines in, padded batches of token ids and completion-only labels out.

Two schemas, one per file:

    {"prompt": "Q: Where do fish live?\\nA:", "completion": " Arr, in the sea, matey!"}
    {"text": "Fish live in the sea."}

A prompt/completion example is tokenised as prompt (with the tokenizer's special tokens, as at
inference) + completion + EOS, and only the completion and EOS carry labels; the prompt's labels are
-100. A text example carries labels on every token. The EOS teaches the adapter to stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.server.errors import UserError

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)

PROMPT_COMPLETION = "prompt/completion"
TEXT = "text"


@dataclass(frozen=True)
class Example:
    """One line of a data file. `prompt` is "" for {"text"} examples, whose text is the completion."""

    prompt: str
    completion: str
    where: str  # "path:line", for messages


@dataclass(frozen=True)
class Encoded:
    """One tokenised example."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt


def load_examples(path: Path) -> list[Example]:
    """Read a JSON Lines file; raise UserError naming the file and line of anything malformed."""
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data file is not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read data file {path}: {error.strerror}") from None
    examples: list[Example] = []
    schema_of_file: tuple[str, int] | None = None  # (schema, first line using it)
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON: {error.msg} at column {error.colno}") from None
        example, schema = _parse_record(record, where)
        if schema_of_file is None:
            schema_of_file = (schema, number)
        elif schema != schema_of_file[0]:
            raise UserError(
                f"{where}: a {_describe(schema)} example, but line {schema_of_file[1]} is "
                f"{_describe(schema_of_file[0])}; use one schema per file"
            )
        examples.append(example)
    if not examples:
        raise UserError(f"data file {path} has no examples (it is empty or only blank lines)")
    return examples


def _parse_record(record: Any, where: str) -> tuple[Example, str]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {_json_type(record)}")
    has_pc = "prompt" in record or "completion" in record
    has_text = "text" in record
    if has_pc and has_text:
        raise UserError(
            f'{where}: mixes "text" with "prompt"/"completion"; use either '
            '{"prompt": ..., "completion": ...} or {"text": ...}'
        )
    if has_text:
        return Example("", _string(record, "text", where, allow_empty=False), where), TEXT
    if has_pc:
        for key in ("prompt", "completion"):
            if key not in record:
                raise UserError(f'{where}: has no "{key}" (a prompt/completion example needs both)')
        prompt = _string(record, "prompt", where, allow_empty=True)
        completion = _string(record, "completion", where, allow_empty=False)
        return Example(prompt, completion, where), PROMPT_COMPLETION
    keys = ", ".join(json.dumps(k) for k in record) or "none"
    raise UserError(
        f'{where}: expected {{"prompt": ..., "completion": ...}} or {{"text": ...}}, got keys: {keys}'
    )


def _string(record: dict, key: str, where: str, *, allow_empty: bool) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
    if not allow_empty and not value:
        raise UserError(f'{where}: "{key}" is empty')
    return value


def _describe(schema: str) -> str:
    return '{"prompt", "completion"}' if schema == PROMPT_COMPLETION else '{"text"}'


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt as training sees it, with the tokenizer's special tokens (e.g. BOS)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode(examples: list[Example], tokenizer: Any, max_length: int) -> list[Encoded]:
    """Tokenise; completion (or text) + EOS carry labels; cut to max_length tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the model's tokenizer has no EOS token, which the adapter needs to learn to stop")
    encoded = []
    for example in examples:
        if example.prompt:
            prompt_ids = encode_prompt(tokenizer, example.prompt)
            completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        else:  # {"text"}: special tokens as for a prompt, every token learned
            prompt_ids = []
            completion_ids = encode_prompt(tokenizer, example.completion)
        completion_ids.append(eos)
        if len(prompt_ids) >= max_length:
            raise UserError(
                f"{example.where}: the prompt is {len(prompt_ids)} tokens, which leaves no room for the "
                f"completion within --max-length {max_length}"
            )
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        encoded.append(Encoded(input_ids, labels))
    return encoded


def batches(encoded: list[Encoded], batch_size: int, order: list[int]) -> Iterator[list[Encoded]]:
    """Consecutive groups of `batch_size` examples in `order`; the last group may be smaller."""
    for start in range(0, len(order), batch_size):
        yield [encoded[i] for i in order[start : start + batch_size]]


def collate(batch: list[Encoded], pad_id: int, device: Any) -> dict[str, Any]:
    """Right-pad to the longest example: input_ids, attention_mask and labels as tensors."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }
