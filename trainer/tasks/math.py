"""Math prompts from the user's local files in verl's RLVR layout, rewarded by math-verify.

Each record (a jsonl line or a parquet row) looks like

    {"data_source": "openai/gsm8k",
     "prompt": [{"role": "user", "content": "What is 6*12? Put the answer in \\boxed{}."}],
     "reward_model": {"style": "rule", "ground_truth": "72"},
     "extra_info": {"index": 0}}

`prompt` may also be a plain string. The uid is the record's `uid` if present, else
`<file stem>-<extra_info.index>`, else `<file stem>-<row>`. The chat template is applied when the
tokenizer has one (with the generation prompt); otherwise a string prompt is used as is and a message
list becomes its contents joined by blank lines. Any bad input raises `DataError` with a one-line
message naming the file and line (jsonl) or row and field (parquet).

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> rec = {"prompt": "6*12=?", "reward_model": {"ground_truth": "72"}, "data_source": "toy"}
    >>> _ = (d / "train.jsonl").write_text(json.dumps(rec) + "\\n")
    >>> task = MathTask(d / "train.jsonl")
    >>> task.train_item(0)
    Prompt(uid='train-0', text='6*12=?', ground_truth='72', data_source='toy')
    >>> task.reward("so \\\\boxed{72}", "72")
    1.0
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from resrl_analysis.rewards import math_verify_reward
from resrl_analysis.rundir import JsonlError, iter_jsonl
from trainer.tasks.base import DataError, Prompt, Task

PathLike = str | os.PathLike

# (where, record): `where` is "file.jsonl:12" or "file.parquet: row 11", used in every error message.
_Located = tuple[str, Any]


def _iter_jsonl(path: Path) -> Iterator[_Located]:
    # The core's one JSONL reader, its errors worded as this task's DataError (byte and column of a bad line).
    try:
        for lineno, record in iter_jsonl(path, objects_only=False):  # a non-object is _field's one-line error
            yield f"{path}:{lineno}", record
    except JsonlError as e:
        where, c = f"{e.path}:{e.line}", e.cause
        if isinstance(c, UnicodeDecodeError):
            byte = c.object[c.start]
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{byte:02x} at column {c.start + 1})") from None
        if isinstance(c, json.JSONDecodeError):
            raise DataError(f"{where}: invalid JSON: {c.msg} (column {c.colno})") from None
        raise DataError(str(e)) from None


def _iter_parquet(path: Path) -> Iterator[_Located]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for bad files
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: cannot read parquet: {msg}") from None
    # to_pylist gives plain dicts and lists (pandas would give numpy arrays of dicts).
    for row, record in enumerate(table.to_pylist()):
        yield f"{path}: row {row}", record


def _field(record: Any, dotted: str, where: str, types: tuple[type, ...], required: bool = True) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    value: Any = record
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if i and not isinstance(value, dict):
            # e.g. "reward_model": "2" where {"ground_truth": "2"} was meant
            outer = ".".join(parts[:i])
            raise DataError(f"{where}: field '{outer}' must be an object with '{parts[i]}', got "
                            f"{type(value).__name__} {value!r}"[:300])
        if part not in value or value[part] is None:
            if required:
                raise DataError(f"{where}: missing field '{dotted}'")
            return None
        value = value[part]
    # bool is an int subclass, but `true` is never a valid ground truth or index.
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: field '{dotted}' must be {names}, got {type(value).__name__}")
    return value


def _messages(prompt: Any, where: str) -> list[dict[str, str]] | str:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return prompt
    if not prompt:
        raise DataError(f"{where}: field 'prompt' is an empty list")
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field 'prompt[{i}]' must be an object with string 'role' and 'content'")
    if not any(m["content"].strip() for m in prompt):
        raise DataError(f"{where}: field 'prompt' has no message with content")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _ground_truth(value: str | int | float, where: str) -> str:
    # JSON allows NaN/Infinity literals and parquet NaN floats: no answer can be verified against them.
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field 'reward_model.ground_truth' is {value}, expected a finite number or text")
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: field 'reward_model.ground_truth' is empty")
    return text


class MathTask(Task):
    """Prompts read from local jsonl/parquet files, math-verify reward.

    Args:
        train_files: one path or a list of paths (`.jsonl` or `.parquet`).
        val_files: held-out files (optional; without them `validation_prompts()` is empty).
        tokenizer: used for the chat template and for measuring prompt length.
        max_prompt_tokens: prompts longer than this (in tokens, after templating) are handled by
            `on_long_prompt`; None keeps every prompt (no tokenizer needed then).
        on_long_prompt: "skip" drops them and counts them in `num_skipped_long`; "error" raises.
        use_chat_template: apply the tokenizer's chat template when it has one.

    Raises:
        DataError: on an unreadable or empty file, bad JSON, non-UTF-8 bytes, a missing or
            ill-typed field, a duplicate uid, a too-long prompt with on_long_prompt="error", or when
            every training prompt was skipped.
    """

    name = "math"
    default_max_new_tokens = 1024

    def __init__(
        self,
        train_files: PathLike | Sequence[PathLike],
        val_files: PathLike | Sequence[PathLike] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_prompt_tokens: int | None = None,
        on_long_prompt: Literal["skip", "error"] = "skip",
        use_chat_template: bool = True,
    ) -> None:
        if on_long_prompt not in ("skip", "error"):
            raise ValueError(f"on_long_prompt must be 'skip' or 'error', got {on_long_prompt!r}")
        if max_prompt_tokens is not None and tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.on_long_prompt = on_long_prompt
        self.use_chat_template = use_chat_template
        self.num_skipped_long = 0
        self._seen_uids: dict[str, str] = {}
        self._train = self._load_all(train_files)
        if not self._train:
            raise DataError(f"no training prompts left: all {self.num_skipped_long} exceed {max_prompt_tokens} tokens")
        self._val = self._load_all(val_files) if val_files is not None else []

    # -- loading ---------------------------------------------------------------------------------

    def _load_all(self, files: PathLike | Sequence[PathLike]) -> list[Prompt]:
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        prompts: list[Prompt] = []
        for p in paths:
            prompts.extend(self._load_file(Path(p)))
        return prompts

    def _load_file(self, path: Path) -> list[Prompt]:
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a .jsonl or .parquet file")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _iter_jsonl(path)
        elif suffix == ".parquet":
            records = _iter_parquet(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl or .parquet)")
        prompts: list[Prompt] = []
        n_records = 0
        for row, (where, record) in enumerate(records):
            n_records += 1
            prompt = self._parse_record(record, where, path.stem, row)
            if prompt is not None:
                prompts.append(prompt)
        if n_records == 0:
            raise DataError(f"{path}: empty file (no records)")
        return prompts

    def _parse_record(self, record: Any, where: str, stem: str, row: int) -> Prompt | None:
        raw_prompt = _field(record, "prompt", where, (str, list))
        gt = _ground_truth(_field(record, "reward_model.ground_truth", where, (str, int, float)), where)
        source = _field(record, "data_source", where, (str,), required=False) or stem
        uid = _field(record, "uid", where, (str, int), required=False)
        if uid is None:
            index = _field(record, "extra_info.index", where, (int, str), required=False)
            uid = f"{stem}-{index if index is not None else row}"
        uid = str(uid)
        if uid in self._seen_uids:
            raise DataError(f"{where}: duplicate uid {uid!r} (first seen at {self._seen_uids[uid]})")
        self._seen_uids[uid] = where
        text, templated = self._render(_messages(raw_prompt, where))
        if self.max_prompt_tokens is not None and self.tokenizer is not None:
            # A chat template writes its own special tokens into the text; don't add them twice.
            n = len(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
            if n > self.max_prompt_tokens:
                if self.on_long_prompt == "error":
                    raise DataError(
                        f"{where}: prompt has {n} tokens, more than max_prompt_tokens={self.max_prompt_tokens}"
                    )
                self.num_skipped_long += 1
                return None
        return Prompt(uid=uid, text=text, ground_truth=gt, data_source=source)

    def _render(self, messages: list[dict[str, str]] | str) -> tuple[str, bool]:
        tok = self.tokenizer
        if self.use_chat_template and tok is not None and getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True
        if isinstance(messages, str):
            return messages, False
        return "\n\n".join(m["content"] for m in messages), False

    # -- Task interface ----------------------------------------------------------------------------

    @property
    def num_train(self) -> int:
        return len(self._train)

    def train_item(self, index: int) -> Prompt:
        return self._train[index]

    def validation_prompts(self) -> list[Prompt]:
        return list(self._val)

    def reward(self, response_text: str, ground_truth: str) -> float:
        """math-verify equivalence of the response's final answer and the ground truth (thread safe)."""
        return math_verify_reward(response_text, ground_truth)
