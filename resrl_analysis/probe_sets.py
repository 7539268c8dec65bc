"""Probe sets: :class:`ProbeSet` and :class:`ProbeGroup`, and every reader of them: our rollout dumps, the run's
prompt files, TRL completion logs, verl rollout dumps, user JSONL, and RLVR datasets sampled with the base
model (docs/FOREIGN_RUNS.md).

A *probe set* is a fixed list of prompt groups, each holding the prompt's token ids, its responses'
token ids and their rewards: every checkpoint is scored on the same text (teacher forcing).

    >>> g = ProbeGroup(group_id=0, prompt_ids=(1, 5), response_ids=((6, 2), (7, 2)), rewards=(1.0, 0.0))
    >>> g.status, g.n_positive, ProbeSet((g,), source="inline").n_responses
    ('mixed', 1, 2)

:func:`load_probe_set` detects the format of a file (or a directory of dumps):

============================  ==========================================================================
our rollout dump              ``rollouts/step_XXXXXX.jsonl`` (token ids; :meth:`ProbeSet.from_rollouts`)
user JSONL                    one prompt per line: ``prompt``, ``responses``, ``rewards`` (:meth:`ProbeSet.from_jsonl`)
TRL completion log            ``completions/completions_NNNNN.parquet``: ``step``, ``prompt``, ``completion``,
                              one column per reward function, ``advantage`` (``log_completions=True``)
verl rollout dump             ``rollout_data_dir/N.jsonl``: ``input``, ``output``, ``score`` (or ``reward``),
                              ``gts``, ``step``, optional ``uid``
prime-rl token export         ``token_exports/step_N/rank_R.jsonl``: ``token_ids``, ``loss_mask``,
                              ``inference_logprobs``, ``rewards``, ``advantages`` per token (exact)
RLVR dataset (JSONL/parquet)  verl's layout (``prompt`` as a chat list, ``reward_model.ground_truth``,
                              ``data_source``) or TRL's (``prompt`` plus an answer column, ``solution`` by
                              default): responses are sampled with the base model and scored
============================  ==========================================================================

Rows are grouped by ``uid`` when present (verl v1's ``{uid}_{session}_{index}`` by its ``uid``), else by
prompt. The logged reward is kept: it is what the run optimised (the probe set's ``notes`` say ``rewards: as
logged``). With ``rescore`` it is recomputed with the reward the trainer used for the row's data source
(:func:`resrl_analysis.rewards.default_reward_fn`: exact match for the multiplication task, the final answer
for addition, math-verify for any other source) wherever a ground truth is known (``rewards: recomputed with
...``); a row that logged none is scored from its ground truth.

Token ids: logged ids are used whenever a source has them (our dumps, prime-rl's token exports, TRL logs
recorded with :func:`resrl_analysis.integrations.trl.record_token_ids`). Text is re-encoded and checked
(:func:`response_ids_from_text`); :meth:`ProbeSet.token_counts` says how many responses come from exact ids,
verified round-trips and unverifiable text.

Prompt text is tokenized once, the way the trainer saw it: a chat message list is rendered with the
tokenizer's chat template and encoded without special tokens; a string that already starts with
BOS or holds any special token (a rendered template, every TRL/verl dump) is encoded without
special tokens too, so no second BOS is prefixed; other strings get the tokenizer's special tokens.

    >>> class Tok:  # a BOS-adding tokenizer: one id per character, BOS = 1
    ...     bos_token, all_special_tokens = "<bos>", ["<bos>", "<eos>"]
    ...     def __call__(self, text, add_special_tokens=True):
    ...         body = [ord(c) for c in text.replace("<bos>", "\\x01")]
    ...         return {"input_ids": ([1] if add_special_tokens else []) + body}
    >>> encode_prompt(Tok(), "ab"), encode_prompt(Tok(), "<bos>ab")
    ((1, 97, 98), (1, 97, 98))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .errors import ProbeError
from .rewards import default_reward_fn
from .sampling.prompts import encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ProbeSet", "ProbeGroup", "encode_prompt", "render_prompt", "detect_format", "load_probe_set",
           "from_records", "from_trl_completions", "from_verl_rollouts", "from_prime_rl_tokens", "from_dataset",
           "reward_origin", "PROBE_SET_KEYWORDS", "from_run_prompts", "TOKEN_ORIGINS", "TextTokens",
           "response_ids_from_text", "read_training_args", "trl_max_completion_length"]

#: ``resrl probe --probe-set KEYWORD``: built from the run directory instead of a file.
PROBE_SET_KEYWORDS = ("heldout", "train", "batch")
FORMATS = ("rollouts", "jsonl", "trl_completions", "verl_rollouts", "prime_rl_tokens", "dataset")
#: Where a response's token ids come from: logged ids, text verified to round-trip, unverifiable text.
TOKEN_ORIGINS = ("exact", "round_trip", "unverified")
_TRL_FIXED = {"step", "prompt", "completion", "advantage", "image", "images", "prompt_ids", "completion_ids"}


# ----------------------------------------------------------------------------- the probe set


def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """:func:`resrl_analysis.rundir.read_jsonl` of a file that must hold rows, its errors as :class:`ProbeError`."""
    try:
        return rundir.read_jsonl(path, nonempty=True)
    except rundir.JsonlError as e:
        raise ProbeError(str(e)) from None


def _field(obj: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise ProbeError(f"{where}: missing field {name!r}")
    v = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):  # JSON true is not an int here
        raise ProbeError(f"{where}: field {name!r} has type {type(v).__name__}")
    return v


def _int_list(obj: dict, name: str, where: str) -> tuple[int, ...]:
    v = _field(obj, name, list, where)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ProbeError(f"{where}: field {name!r} must be a list of non-negative ints")
    return tuple(v)


def _logprob_list(v: Any, n: int, where: str) -> tuple[float, ...] | None:
    """A logged per-token log-prob list of ``n`` tokens (None: not logged, or a value missing)."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise ProbeError(f"{where}: expected a list of {n} log-probs (one per response token)")
    if any(x is None for x in v):
        return None  # a value the writer could not store (non-finite): the response has no usable log-probs
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ProbeError(f"{where}: log-probs must be numbers")
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class ProbeGroup:
    """One prompt with its responses, token ids without padding, and their rewards.

    A response is positive when its reward is > 0 (as the trainer's ``is_positive``).
    """

    group_id: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...]
    prompt: str = ""
    responses: tuple[str, ...] = ()
    ground_truth: str | None = None
    prompt_uid: str = ""
    data_source: str = ""
    #: Per response, where its token ids come from (:data:`TOKEN_ORIGINS`); empty: all ``"exact"``.
    token_origins: tuple[str, ...] = ()
    #: Per response, the sampler's log-prob of each of its tokens as the source logged them (None where it
    #: logged none); empty: none logged.
    logged_logprobs: tuple[tuple[float, ...] | None, ...] = ()

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.rewards):
            raise ValueError(f"group {self.group_id}: {len(self.response_ids)} responses but "
                             f"{len(self.rewards)} rewards")
        if len(self.prompt_ids) == 0:
            raise ValueError(f"group {self.group_id}: empty prompt")
        if self.token_origins and (len(self.token_origins) != self.n_responses
                                   or not set(self.token_origins) <= set(TOKEN_ORIGINS)):
            raise ValueError(f"group {self.group_id}: token_origins must name one of {TOKEN_ORIGINS} per response")
        if self.logged_logprobs:
            if len(self.logged_logprobs) != self.n_responses:
                raise ValueError(f"group {self.group_id}: logged_logprobs must hold one entry per response")
            for r, lp in zip(self.response_ids, self.logged_logprobs):
                if lp is not None and len(lp) != len(r):
                    raise ValueError(f"group {self.group_id}: {len(lp)} logged log-probs for {len(r)} tokens")

    @property
    def origins(self) -> tuple[str, ...]:
        """Where each response's token ids come from: ``"exact"`` (logged ids), ``"round_trip"`` (text that
        encodes back to the same text) or ``"unverified"`` (:func:`response_ids_from_text`)."""
        return self.token_origins or ("exact",) * self.n_responses

    @property
    def n_responses(self) -> int:
        return len(self.response_ids)

    @property
    def is_positive(self) -> tuple[bool, ...]:
        return tuple(r > 0 for r in self.rewards)

    @property
    def n_positive(self) -> int:
        return sum(self.is_positive)

    @property
    def n_negative(self) -> int:
        return self.n_responses - self.n_positive

    @property
    def status(self) -> str:
        """``"mixed"``, ``"no_positive"`` or ``"no_negative"``."""
        if self.n_positive == 0:
            return "no_positive"
        if self.n_negative == 0:
            return "no_negative"
        return "mixed"

    @property
    def is_mixed(self) -> bool:
        return self.status == "mixed"


@dataclass(frozen=True)
class ProbeSet:
    """A fixed, teacher-forced probe set: prompt groups scored identically at every checkpoint.

    ``source`` says where it came from, ``step`` the rollout step it was taken from (None for a
    user file), ``notes`` anything dropped while reading.
    """

    groups: tuple[ProbeGroup, ...]
    source: str = ""
    step: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The reader that made it (one of :data:`FORMATS`, or ``"run_prompts"``/``""``).
    kind: str = ""
    #: The checkpoint step whose policy sampled the responses, when the source says (the logged log-probs are
    #: that policy's).
    sampler_step: int | None = None
    #: The temperature the logged log-probs are at, when the source says.
    logprob_temperature: float | None = None

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_responses(self) -> int:
        return sum(g.n_responses for g in self.groups)

    @property
    def n_mixed(self) -> int:
        return sum(g.is_mixed for g in self.groups)

    @property
    def max_token_id(self) -> int:
        return max(max(g.prompt_ids + tuple(t for r in g.response_ids for t in r)) for g in self.groups)

    def token_counts(self) -> dict[str, int]:
        """How many responses are scored from exact (logged) token ids, from verified round-trips of their
        text, and from unverifiable text.

        >>> g = ProbeGroup(0, (1,), ((3,), (4,)), (1.0, 0.0), token_origins=("exact", "unverified"))
        >>> ProbeSet((g,)).token_counts()
        {'exact': 1, 'round_trip': 0, 'unverified': 1}
        """
        out = dict.fromkeys(TOKEN_ORIGINS, 0)
        for g in self.groups:
            for o in g.origins:
                out[o] += 1
        return out

    @property
    def n_logged_logprobs(self) -> int:
        """Responses whose sampler log-probs the source logged."""
        return sum(lp is not None for g in self.groups for lp in g.logged_logprobs)

    def describe(self) -> dict:
        """A JSON-able summary (for ``summary.json`` and result metadata): ``tokens`` counts the responses
        scored from exact ids, verified round-trips and unverifiable text (:meth:`token_counts`)."""
        return {"source": self.source, "kind": self.kind, "step": self.step, "n_groups": self.n_groups,
                "n_mixed": self.n_mixed, "n_responses": self.n_responses, "tokens": self.token_counts(),
                "n_logged_logprobs": self.n_logged_logprobs, "sampler_step": self.sampler_step,
                "notes": list(self.notes)}

    def select(self, n_groups: int | None = None, *, prefer_mixed: bool = True) -> ProbeSet:
        """The first ``n_groups`` groups, mixed groups (both positive and negative responses) first.

        Interference, the bound and the first-order split need mixed groups; with ``prefer_mixed``
        a small probe set spends its budget on them (order within each kind is kept).

        >>> g = lambda i, r: ProbeGroup(i, (1,), ((3,),) * len(r), tuple(r))
        >>> [x.group_id for x in ProbeSet((g(0, [0, 0]), g(1, [1, 0]), g(2, [1, 1]))).select(2).groups]
        [1, 0]
        """
        groups = list(self.groups)
        if prefer_mixed:
            groups = [g for g in groups if g.is_mixed] + [g for g in groups if not g.is_mixed]
        if n_groups is not None:
            if n_groups < 1:
                raise ValueError(f"n_groups must be >= 1, got {n_groups}")
            groups = groups[:n_groups]
        return replace(self, groups=tuple(groups))

    def check_vocab(self, vocab_size: int, where: str = "model") -> None:
        """Raise :class:`ProbeError` if a token id is outside the model's vocabulary."""
        if self.max_token_id >= vocab_size:
            raise ProbeError(f"{self.source}: token id {self.max_token_id} outside the {where}'s vocabulary "
                             f"of {vocab_size}; was the probe set made with another tokenizer?")

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_rollouts(cls, path: str | Path) -> ProbeSet:
        """Read a rollout dump ``rollouts/step_XXXXXX.jsonl`` (docs/RUN_DIRECTORY.md).

        Rows are grouped by ``group_id`` in order of first appearance; responses with no token are
        dropped (and counted in ``notes``).
        """
        path = Path(path)
        rows = _read_jsonl(path)
        by_group: dict[int, list[tuple[int, dict]]] = {}
        for i, obj in rows:
            gid = _field(obj, "group_id", int, f"{path}:{i}")
            by_group.setdefault(gid, []).append((i, obj))
        groups, dropped = [], 0
        for gid, items in by_group.items():
            i0, first = items[0]
            where0 = f"{path}:{i0}"
            prompt_ids = _int_list(first, "prompt_ids", where0)
            resp_ids, resp_text, rewards, logprobs = [], [], [], []
            for i, obj in items:
                where = f"{path}:{i}"
                if _int_list(obj, "prompt_ids", where) != prompt_ids:
                    raise ProbeError(f"{where}: prompt_ids differ within group {gid}")
                ids = _int_list(obj, "response_ids", where)
                reward = float(_field(obj, "reward", (int, float), where))
                if not math.isfinite(reward):
                    raise ProbeError(f"{where}: field 'reward' must be a finite number, got {reward}")
                if "is_positive" in obj and bool(obj["is_positive"]) != (reward > 0):
                    raise ProbeError(f"{where}: is_positive={obj['is_positive']} disagrees with reward {reward}")
                if not ids:
                    dropped += 1
                    continue
                resp_ids.append(ids)
                resp_text.append(str(obj.get("response", "")))
                rewards.append(reward)
                logprobs.append(_logprob_list(obj.get("token_logprobs"), len(ids), f"{where}: field 'token_logprobs'"))
            if not resp_ids:
                continue
            gt = first.get("ground_truth")
            groups.append(ProbeGroup(
                group_id=gid, prompt_ids=prompt_ids, response_ids=tuple(resp_ids), rewards=tuple(rewards),
                prompt=str(first.get("prompt", "")), responses=tuple(resp_text),
                ground_truth=None if gt is None else str(gt), prompt_uid=str(first.get("prompt_uid", gid)),
                data_source=str(first.get("data_source", "")),
                logged_logprobs=tuple(logprobs) if any(lp is not None for lp in logprobs) else (),
            ))
        if not groups:
            raise ProbeError(f"{path}: no response with tokens")
        steps = {obj.get("step") for _, obj in rows}
        step = steps.pop() if len(steps) == 1 else None
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        notes = (f"dropped {dropped} empty responses",) if dropped else ()
        # The dump's token_logprobs are the rollout policy's (checkpoint `step`) at the sampling temperature.
        temp = _run_setting(path.parent.parent, "temperature", None) if path.parent.name == rundir.ROLLOUTS else None
        return cls(groups=tuple(groups), source=str(path), step=step, notes=notes, kind="rollouts",
                   sampler_step=step, logprob_temperature=float(temp) if isinstance(temp, (int, float)) else None)

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int = 0) -> ProbeSet:
        """The probe set of a run: ``RUN_DIR/rollouts/step_XXXXXX.jsonl`` (step 0 by default, so
        every checkpoint is scored on what the starting policy sampled)."""
        path = rundir.rollout_path(run_dir, step)
        if not path.is_file():
            raise ProbeError(f"{path}: rollout dump not found")
        return cls.from_rollouts(path)

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        append_eos: bool = True,
        add_special_tokens: bool = True,
    ) -> ProbeSet:
        """A user probe set: one JSON object per prompt with ``prompt`` (a string, or a list of chat
        messages), ``responses`` (list of str), ``rewards`` (list of numbers); optional ``ground_truth``,
        ``group_id``, ``prompt_uid``, ``finished`` (one bool per response: False for one cut at the length
        limit), and ``prompt_ids`` / ``response_ids`` (then no tokenizer is needed: exact tokens).

        Text is tokenized with ``tokenizer``: a string prompt with its special tokens (as the model saw
        it), a message list through the tokenizer's chat template with the generation prompt (as TRL
        renders it), each response without special tokens and, when finished (``append_eos`` unless the
        row's ``finished`` says otherwise), followed by EOS. Each text response is checked to encode back to
        the same text (:func:`response_ids_from_text`). A file in the rollout-dump format (one response per
        line) is read as such.
        """
        path = Path(path)
        rows = _read_jsonl(path)
        if "responses" not in rows[0][1] and "response_ids" in rows[0][1]:
            return cls.from_rollouts(path)
        groups = []
        for n, (i, obj) in enumerate(rows):
            where = f"{path}:{i}"
            prompt = _field(obj, "prompt", (str, list), where)
            responses = _field(obj, "responses", list, where)
            rewards = _field(obj, "rewards", list, where)
            if len(responses) != len(rewards) or not responses:
                raise ProbeError(f"{where}: need as many rewards as responses (and at least one), got "
                                 f"{len(responses)} and {len(rewards)}")
            if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                raise ProbeError(f"{where}: field 'rewards' must hold numbers")
            if not all(math.isfinite(r) for r in rewards):
                raise ProbeError(f"{where}: field 'rewards' must hold finite numbers, got {rewards}")
            if not all(isinstance(r, str) for r in responses):
                raise ProbeError(f"{where}: field 'responses' must hold strings")
            finished = obj.get("finished")
            if finished is not None and (not isinstance(finished, list) or len(finished) != len(responses)
                                         or not all(isinstance(f, bool) for f in finished)):
                raise ProbeError(f"{where}: field 'finished' must be one true/false per response")
            origins: tuple[str, ...] = ()
            if "prompt_ids" in obj and "response_ids" in obj:
                prompt_ids = _int_list(obj, "prompt_ids", where)
                resp_ids = obj["response_ids"]
                if not isinstance(resp_ids, list) or len(resp_ids) != len(responses):
                    raise ProbeError(f"{where}: field 'response_ids' must be one id list per response")
                resp = tuple(_int_list({"r": r}, "r", where) for r in resp_ids)
                if not isinstance(prompt, str):
                    prompt = json.dumps(prompt, ensure_ascii=False)
            else:
                if tokenizer is None:
                    raise ProbeError(f"{where}: text without token ids needs a tokenizer")
                if isinstance(prompt, list):  # chat messages: the template, as TRL renders a conversational prompt
                    try:
                        prompt, _ = render_prompt(tokenizer, prompt)
                    except ProbeError as e:
                        raise ProbeError(f"{where}: {e}") from None
                    prompt_ids = encode_prompt(tokenizer, prompt, templated=True)
                else:
                    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
                made = [response_ids_from_text(tokenizer, r, finished=finished[k] if finished else append_eos)
                        for k, r in enumerate(responses)]
                resp = tuple(m.ids for m in made)
                origins = tuple(m.origin for m in made)
            if any(len(r) == 0 for r in resp):
                raise ProbeError(f"{where}: a response has no tokens")
            gt = obj.get("ground_truth")
            gid = obj.get("group_id", n)
            if isinstance(gid, bool) or not isinstance(gid, int):
                raise ProbeError(f"{where}: field 'group_id' must be an integer, got {type(gid).__name__} {gid!r}")
            groups.append(ProbeGroup(
                group_id=int(gid), prompt_ids=prompt_ids, response_ids=resp,
                rewards=tuple(float(r) for r in rewards), prompt=prompt, responses=tuple(responses),
                ground_truth=None if gt is None else str(gt), prompt_uid=str(obj.get("prompt_uid", gid)),
                data_source=str(obj.get("data_source", "")), token_origins=origins,
            ))
        ps = cls(groups=tuple(groups), source=str(path), step=None, kind="jsonl")
        return replace(ps, notes=_token_notes(ps, {}))


# ----------------------------------------------------------------------------- prompt encoding


def render_prompt(tokenizer: Any, prompt: str | Sequence[dict]) -> tuple[str, bool]:
    """(text, templated): a string as is; a chat message list through the tokenizer's chat template
    (with the generation prompt, as TRL and verl render it)."""
    if isinstance(prompt, str):
        return prompt, False
    msgs = [dict(m) for m in prompt]
    if not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise ProbeError("prompt: expected a string or a list of chat messages with 'role' and 'content'")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ProbeError("prompt is a chat message list but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True


def _completion_text(c: Any) -> str:
    # A conversational completion is a list of messages: the assistant's contents, in order.
    if isinstance(c, str):
        return c
    if isinstance(c, (list, tuple)):
        return "".join(str(m.get("content", "")) for m in c if isinstance(m, dict))
    return "" if c is None else str(c)


def _plain(v: Any) -> Any:
    # parquet gives numpy arrays and scalars; the readers want lists, dicts and Python numbers.
    import numpy as np

    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ----------------------------------------------------------------------------- records → probe set


@dataclass(frozen=True)
class TextTokens:
    """The token ids a text response is scored with (:func:`response_ids_from_text`): ``ids`` (EOS appended
    when ``finished``), ``origin`` (``"round_trip"`` or ``"unverified"``) and, when unverified, ``reason``."""

    ids: tuple[int, ...]
    origin: str
    reason: str
    finished: bool


def response_ids_from_text(tokenizer: Any, text: str, *, finished: bool | None = None,
                           max_tokens: int | None = None) -> TextTokens:
    """Token ids for a response logged as text, and whether they can be trusted to be the model's.

    The text is encoded without special tokens. It is a *verified round-trip* when those ids decode back to
    the same text and the text shows no sign of lossy decoding (U+FFFD, where the sampled bytes were not valid
    UTF-8): the ids then score exactly the logged text, and are the sampled ids unless the model sampled a
    non-canonical split of the same text (the ``fidelity`` probe catches that where log-probs were logged).
    Otherwise it is *unverified*, and so is a response whose finish cannot be known.

    ``finished``: whether the response ended with EOS, when the source says. Else ``max_tokens`` (the run's
    completion-length limit) decides: a response of that many tokens ended by length and gets no EOS, a longer
    one cannot be the model's; without either the response is taken as finished and counted unverified.

    >>> class Tok:  # one id per character, EOS = 0
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [ord(c) for c in text]}
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(chr(i) for i in ids if i)
    >>> response_ids_from_text(Tok(), "ab", max_tokens=3)
    TextTokens(ids=(97, 98, 0), origin='round_trip', reason='', finished=True)
    >>> response_ids_from_text(Tok(), "abc", max_tokens=3).ids  # cut at the limit: no EOS
    (97, 98, 99)
    >>> response_ids_from_text(Tok(), "a\ufffd", finished=True).reason
    'lossy decode'
    """
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    reason = ""
    if "\ufffd" in text:  # invalid UTF-8 was sampled and replaced: the bytes are gone, so are the ids
        reason = "lossy decode"
    elif tokenizer.decode(list(ids), skip_special_tokens=True) != text:
        reason = "no round trip"
    if finished is None:
        if max_tokens is None:
            finished, reason = True, reason or "finish unknown"
        elif len(ids) > max_tokens:
            finished, reason = False, reason or "longer than max_completion_length"
        else:
            finished = len(ids) < max_tokens
    eos = getattr(tokenizer, "eos_token_id", None)
    out = ids + ((eos,) if finished and eos is not None else ())
    return TextTokens(out, "unverified" if reason else "round_trip", reason, bool(finished))


def _token_notes(ps: ProbeSet, reasons: dict[str, int], *, cut: int = 0, limit: str = "") -> tuple[str, ...]:
    """The probe set's notes plus one line counting where its tokens come from (and why some are unverified)."""
    c = ps.token_counts()
    line = (f"tokens: {c['exact']} from exact ids, {c['round_trip']} verified round-trips, "
            f"{c['unverified']} unverifiable text")
    if reasons:
        line += " (" + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) + ")"
    notes = [n for n in ps.notes if not n.startswith("tokens: ")] + [line]
    if cut:
        notes.append(f"no EOS after {cut} responses that ended by length ({limit})")
    return tuple(notes)


@dataclass
class _Record:
    where: str
    prompt: Any  # str or chat messages
    response: str
    reward: float | None
    ground_truth: str | None = None
    uid: str | None = None
    data_source: str = ""
    step: int | None = None
    finished: bool | None = None  # when the source says whether the response ended with EOS
    prompt_ids: tuple[int, ...] | None = None  # logged ids: exact
    response_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None  # the sampler's per-token log-probs of response_ids


def reward_origin(probe_set: ProbeSet) -> str:
    """``"recomputed"``, ``"as_logged"`` or ``"mixed"``: where the probe set's rewards came from
    (``""`` for a set that does not say)."""
    for n in probe_set.notes:
        if n.startswith("rewards: recomputed"):
            return "recomputed"
        if n.startswith("rewards: as logged"):
            return "as_logged"
        if n.startswith("rewards: mixed"):
            return "mixed"
    return ""


def from_records(records: Sequence[_Record], tokenizer: Any, *, source: str, append_eos: bool = True,
                 reward_fn: Callable[[str, str], float] | None = None, rescore: bool = False,
                 max_tokens: int | None = None, limit_from: str = "", kind: str = "") -> ProbeSet:
    """Group prompt/response/reward records by ``uid`` (else prompt) into a probe set.

    Rewards: the logged reward; with ``rescore``, recomputed with ``reward_fn`` (default: the data source's task
    reward) wherever a ground truth is known; a row with no logged reward is scored from its ground truth. Token
    ids: the logged ones when a record has them (exact); else the text, encoded without special tokens and
    followed by EOS when finished (:func:`response_ids_from_text`: the record's ``finished``, else ``max_tokens``,
    else ``append_eos``), each counted as a verified round-trip or unverifiable."""
    groups: dict[str, list[_Record]] = {}
    for r in records:
        key = r.uid if r.uid is not None else json.dumps(r.prompt, sort_keys=True, ensure_ascii=False)
        groups.setdefault(key, []).append(r)
    if tokenizer is None and any(r.response_ids is None or r.prompt_ids is None for r in records):
        raise ProbeError(f"{source}: text probe sets need a tokenizer (give a checkpoint with tokenizer files)")
    out, dropped, n_recomputed, n_logged, cut = [], 0, 0, 0, 0
    reasons: dict[str, int] = {}
    fns: dict[str, Callable] = {}
    for gid, (key, items) in enumerate(groups.items()):
        first = items[0]
        if isinstance(first.prompt, str) and first.prompt_ids is not None and tokenizer is None:
            text, prompt_ids = first.prompt, first.prompt_ids
        else:
            try:
                text, templated = render_prompt(tokenizer, first.prompt)
            except ProbeError as e:
                raise ProbeError(f"{first.where}: {e}") from None
            prompt_ids = first.prompt_ids or encode_prompt(tokenizer, text, templated=templated)
        ids, texts, rewards, origins, logprobs = [], [], [], [], []
        for r in items:
            if r.response_ids is not None:
                rid, origin = r.response_ids, "exact"
            else:
                made = response_ids_from_text(tokenizer, r.response, max_tokens=max_tokens,
                                              finished=r.finished if r.finished is not None
                                              else (None if append_eos else False))
                rid, origin = made.ids, made.origin
                if made.reason:
                    reasons[made.reason] = reasons.get(made.reason, 0) + 1
                cut += not made.finished and r.finished is None
            if not rid:
                dropped += 1
                continue
            if r.ground_truth is not None and (rescore or r.reward is None):
                fn = reward_fn or fns.setdefault(r.data_source, default_reward_fn(r.data_source))
                reward = float(fn(r.response, r.ground_truth))
                n_recomputed += 1
            elif r.reward is None or not math.isfinite(r.reward):
                raise ProbeError(f"{r.where}: no reward and no ground truth to compute one from")
            else:
                reward = float(r.reward)
                n_logged += 1
            ids.append(rid)
            texts.append(r.response)
            rewards.append(reward)
            origins.append(origin)
            logprobs.append(r.logprobs)
        if not ids:
            continue
        out.append(ProbeGroup(group_id=gid, prompt_ids=tuple(prompt_ids), response_ids=tuple(ids),
                              rewards=tuple(rewards), prompt=text, responses=tuple(texts),
                              ground_truth=first.ground_truth, prompt_uid=first.uid or key[:64],
                              data_source=first.data_source, token_origins=tuple(origins),
                              logged_logprobs=tuple(logprobs) if any(lp is not None for lp in logprobs) else ()))
    if not out:
        raise ProbeError(f"{source}: no response with tokens")
    names = sorted({getattr(f, "__name__", repr(f)) for f in ([reward_fn] if reward_fn else fns.values())})
    if n_recomputed and n_logged:
        notes = [f"rewards: mixed ({n_recomputed} recomputed with {','.join(names)}, {n_logged} as logged)"]
    elif n_recomputed:
        why = "--rescore: the logged reward replaced" if rescore else "no reward logged"
        notes = [f"rewards: recomputed with {','.join(names)} ({why})"]
    else:
        notes = ["rewards: as logged"]
        if rescore:
            notes.append("--rescore: no ground truth in the source, so nothing was recomputed")
    if dropped:
        notes.append(f"dropped {dropped} empty responses")
    steps = {r.step for r in records}
    step = steps.pop() if len(steps) == 1 else None
    ps = ProbeSet(groups=tuple(out), source=source, step=step if isinstance(step, int) else None,
                  notes=tuple(notes), kind=kind)
    limit = f"max_completion_length {max_tokens}" + (f" from {limit_from}" if limit_from else "")
    return replace(ps, notes=_token_notes(ps, reasons, cut=cut, limit=limit))


# ----------------------------------------------------------------------------- file formats


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of a JSONL or parquet file."""
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one line naming the file
            raise ProbeError(f"{path}: cannot read parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if df.empty:
            raise ProbeError(f"{path}: empty file")
        return [(f"{path}:row {i}", _plain(r)) for i, r in enumerate(df.to_dict(orient="records"))]
    return [(f"{path}:{i}", obj) for i, obj in _read_jsonl(path)]


def _pick_file(path: Path, step: int | None) -> Path:
    """A directory of dumps → its file for ``step`` (default: the oldest)."""
    if not path.is_dir():
        return path
    files = [f for f in path.iterdir() if f.suffix in (".jsonl", ".parquet") and f.is_file()]

    def num(f: Path) -> int | None:
        digits = "".join(c for c in f.stem if c.isdigit())
        return int(digits) if digits else None

    files = sorted((f for f in files if num(f) is not None), key=num)  # type: ignore[arg-type]
    if not files:
        raise ProbeError(f"{path}: no numbered .jsonl or .parquet dump in the directory")
    if step is None:
        return files[0]
    pick = [f for f in files if num(f) == step]
    if not pick:
        raise ProbeError(f"{path}: no dump for step {step} (have {[num(f) for f in files]})")
    return pick[0]


def _ground_truth(row: dict) -> str | None:
    rm = row.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return str(rm["ground_truth"])
    for k in ("ground_truth", "gts", "answer", "solution"):
        if row.get(k) is not None:
            return str(row[k])
    return None


def detect_format(path: str | Path, *, answer_column: str = "solution") -> str:
    """Which reader fits the file: one of :data:`FORMATS` (from the first row's fields).

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "3.jsonl"
    >>> _ = f.write_text('{"input": "2*3=", "output": "6", "score": 1.0, "gts": "6", "step": 3}\\n')
    >>> detect_format(f)
    'verl_rollouts'
    """
    path = Path(path)
    where, row = _read_rows(path)[0]
    keys = set(row)
    if {"token_ids", "loss_mask", "inference_logprobs"} <= keys:
        return "prime_rl_tokens"
    if "completion" in keys and "prompt" in keys:
        return "trl_completions"
    if "input" in keys and "output" in keys:
        return "verl_rollouts"
    if "response_ids" in keys and "prompt_ids" in keys and "responses" not in keys:
        return "rollouts"
    if "responses" in keys:
        return "jsonl"
    if "prompt" in keys and (answer_column in keys or "reward_model" in keys or "ground_truth" in keys):
        return "dataset"
    raise ProbeError(f"{where}: unknown probe-set format (fields {sorted(keys)}); expected a rollout dump, a "
                     "prompt/responses/rewards JSONL, a TRL completions parquet, a verl rollout JSONL or a dataset "
                     f"with prompt and {answer_column!r} / reward_model.ground_truth")


def _from_user_jsonl(path: Path, tokenizer: Any) -> ProbeSet:
    # The user's rewards are explicit: kept as given. Text prompts are re-encoded under the one
    # prefix rule (ProbeSet.from_jsonl always adds special tokens, doubling a BOS already written).
    ps = ProbeSet.from_jsonl(path, tokenizer)
    plain = [not ("prompt_ids" in obj and "response_ids" in obj) and isinstance(obj.get("prompt"), str)
             for _, obj in _read_jsonl(path)]  # message lists are already rendered and encoded once
    groups = tuple(replace(g, prompt_ids=encode_prompt(tokenizer, g.prompt)) if text else g
                   for g, text in zip(ps.groups, plain))
    return replace(ps, groups=groups, notes=(*ps.notes, "rewards: as logged"))


class _Stub:
    """Stands for any class a pickle names: built from its state, never calling the real class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots)
        if isinstance(state, dict):
            self.__dict__.update(state)


def read_training_args(path: str | Path) -> dict[str, Any]:
    """The fields of a Hugging Face ``training_args.bin`` (``torch.save`` of a ``TrainingArguments``, e.g. TRL's
    ``GRPOConfig``), read without running any of its code: every class the pickle names is replaced by an inert
    stand-in, so nothing is imported or called (unlike ``torch.load(weights_only=False)``).

    Raises:
        ProbeError: the file is not a readable torch zip archive.
    """
    import io
    import pickle
    import zipfile

    class Inert(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "copyreg" and name == "_reconstructor":
                return lambda cls, base, state: cls() if isinstance(cls, type) else _Stub()
            return type(name, (_Stub,), {"__module__": "resrl_inert." + module})

        def persistent_load(self, pid: Any) -> None:  # tensor storages: not needed for the settings
            return None

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise ProbeError(f"{path}: no data.pkl in the archive")
            obj = Inert(io.BytesIO(z.read(name))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise ProbeError(f"{path}: cannot read the training arguments ({type(e).__name__}: {e})") from None
    return dict(vars(obj)) if isinstance(obj, _Stub) else {}


def trl_max_completion_length(run_dir: str | Path) -> tuple[int | None, str]:
    """``(max_completion_length, where)`` of a TRL output directory, from its ``training_args.bin`` (the root's,
    else the newest ``checkpoint-N/``'s); ``(None, "")`` when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None, ""
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in run_dir.iterdir()
                   if p.name.startswith("checkpoint-") and p.name.split("-")[1].isdigit())
    for d in [run_dir] + [p for _, p in reversed(ckpts)]:
        f = d / "training_args.bin"
        if f.is_file():
            try:
                v = read_training_args(f).get("max_completion_length")
            except ProbeError:
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, str(f)
    return None, ""


def _ids_column(v: Any, where: str, name: str) -> tuple[int, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ProbeError(f"{where}: field {name!r} must be a list of non-negative ints")
    return tuple(v)


def from_trl_completions(path: str | Path, tokenizer: Any, *, reward_column: str | None = None,
                         max_completion_length: int | None = None, rescore: bool = False) -> ProbeSet:
    """TRL's ``completions_NNNNN.parquet``. The reward is ``reward_column``, else the one reward
    column, else the sum of all (TRL's default ``reward_weights`` are 1): the log has no ground truth,
    so rewards are kept as logged.

    Token ids: the ``prompt_ids`` / ``completion_ids`` columns when the run recorded them
    (:func:`resrl_analysis.integrations.trl.record_token_ids`, or ``ProbeCallback``): exact. Otherwise the
    text is re-encoded (:func:`response_ids_from_text`): a completion of ``max_completion_length`` tokens (default:
    read from the run's ``training_args.bin``) ended by length and gets no EOS."""
    path = Path(path)
    rows = _read_rows(path)
    cols = [k for k in rows[0][1] if k not in _TRL_FIXED and isinstance(rows[0][1][k], (int, float, type(None)))
            and not isinstance(rows[0][1][k], bool)]
    if reward_column is not None:
        if reward_column not in rows[0][1]:
            raise ProbeError(f"{path}: no reward column {reward_column!r} (have {sorted(rows[0][1])})")
        cols = [reward_column]
    if not cols:
        raise ProbeError(f"{path}: no reward column (a numeric column beside step, prompt, completion, advantage)")
    limit_from = "--max-completion-length"
    if max_completion_length is None:
        max_completion_length, limit_from = trl_max_completion_length(path.parent.parent)
    recs = []
    for where, r in rows:
        vals = [r.get(c) for c in cols]
        vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        pids, cids = _ids_column(r.get("prompt_ids"), where, "prompt_ids"), \
            _ids_column(r.get("completion_ids"), where, "completion_ids")
        recs.append(_Record(where, r["prompt"], _completion_text(r["completion"]), sum(vals) if vals else None,
                            step=r.get("step"), prompt_ids=pids if cids is not None else None, response_ids=cids))
    ps = from_records(recs, tokenizer, source=str(path), max_tokens=max_completion_length, limit_from=limit_from,
                      rescore=rescore, kind="trl_completions")
    note = f"reward = {cols[0]}" if len(cols) == 1 else f"reward = sum of {cols}"
    # TRL logs the completions at the end of the step that sampled them: the policy was step - 1's.
    return replace(ps, notes=(*ps.notes, note), sampler_step=ps.step - 1 if ps.step else None)


_VERL_V1_KEY = re.compile(r"^(.*)_(\d+)_(\d+)$")


def from_verl_rollouts(path: str | Path, tokenizer: Any, *, rescore: bool = False,
                       max_completion_length: int | None = None) -> ProbeSet:
    """verl's ``rollout_data_dir`` dump (``N.jsonl``): ``input`` (prompt text), ``output``, ``score``
    (or ``reward`` / ``acc``), ``gts`` (ground truth, newer verl), ``step``, optional ``uid`` and
    ``data_source``. The logged score is the reward (``rescore``: recomputed from ``gts``).

    verl's v1 trainer keys a row as ``{uid}_{session}_{index}``: rows are grouped by that ``uid`` prefix. The dump
    holds decoded text only (``skip_special_tokens=True``) and no finish reason: give ``max_completion_length``
    (verl's ``data.max_response_length``) to tell responses cut by length. Optional ``prompt_ids`` /
    ``response_ids`` / ``rollout_log_probs`` columns (a reward function's extra info may add them) are used as
    exact ids and logged log-probs."""
    path = Path(path)
    recs, v1 = [], 0
    for where, r in _read_rows(path):
        if not isinstance(r.get("input"), str) or not isinstance(r.get("output"), str):
            raise ProbeError(f"{where}: fields 'input' and 'output' must be strings")
        score = next((r[k] for k in ("score", "reward", "acc") if isinstance(r.get(k), (int, float))), None)
        gts = r.get("gts")
        uid = None if r.get("uid") is None else str(r["uid"])
        if uid is not None and (m := _VERL_V1_KEY.match(uid)):
            uid, v1 = m.group(1), v1 + 1
        rids = _ids_column(r.get("response_ids"), where, "response_ids")
        pids = _ids_column(r.get("prompt_ids"), where, "prompt_ids")
        lp = _logprob_list(r.get("rollout_log_probs"), len(rids), f"{where}: field 'rollout_log_probs'") \
            if rids is not None and r.get("rollout_log_probs") is not None else None
        recs.append(_Record(where, r["input"], r["output"], None if score is None else float(score),
                            ground_truth=None if gts is None else str(gts), uid=uid,
                            data_source=str(r.get("data_source", "")), step=r.get("step"),
                            prompt_ids=pids if rids is not None else None, response_ids=rids, logprobs=lp))
    ps = from_records(recs, tokenizer, source=str(path), rescore=rescore, max_tokens=max_completion_length,
                      limit_from="--max-completion-length", kind="verl_rollouts")
    notes = ps.notes + ((f"grouped by the uid prefix of {v1} verl v1 keys ({{uid}}_{{session}}_{{index}})",)
                        if v1 else ())
    # verl dumps step N's batch, sampled by the policy before update N: checkpoint global_step_{N-1}.
    return replace(ps, notes=notes, sampler_step=ps.step - 1 if ps.step else None)


def _prime_rl_files(path: Path, step: int | None) -> list[Path]:
    """The rank files of one step of prime-rl's ``token_exports/`` (a rank file, a ``step_N`` folder, or the
    ``token_exports`` folder: its ``step`` or oldest step)."""
    if path.is_file():
        return [path]
    steps = sorted((int(d.name[5:]), d) for d in path.iterdir() if d.is_dir() and re.fullmatch(r"step_\d+", d.name))
    if steps:
        pick = [d for s, d in steps if step is None or s == step]
        if not pick:
            raise ProbeError(f"{path}: no token export for step {step} (have {[s for s, _ in steps]})")
        path = pick[0]
    files = sorted(path.glob("rank_*.jsonl"), key=lambda f: int(re.sub(r"\D", "", f.stem) or 0))
    if not files:
        raise ProbeError(f"{path}: no rank_R.jsonl token export")
    return files


def from_prime_rl_tokens(path: str | Path, *, step: int | None = None) -> ProbeSet:
    """prime-rl's per-token exports, ``token_exports/step_N/rank_R.jsonl`` (every rank of the step): one record per
    sequence with ``token_ids``, ``loss_mask``, ``inference_logprobs``, ``trainer_logprobs``, ``advantages``,
    ``rewards`` and ``temperatures`` per token. Exact by construction: the prompt is the tokens before the first
    trained one (``loss_mask``), the response the trained tokens after it, the inference log-probs are the
    sampler's, at the logged temperature. Sequences that interleave untrained tokens in the response (tool
    output, several turns) cannot be scored as one response and are dropped (counted in ``notes``). Records with
    the same prompt ids form a group."""
    path = Path(path)
    files = _prime_rl_files(path, step)
    groups: dict[tuple[int, ...], list] = {}
    steps, temps, multi, by_adv = set(), set(), 0, 0
    for f in files:
        for i, r in _read_jsonl(f):
            where = f"{f}:{i}"
            ids = _int_list(r, "token_ids", where)
            mask = _field(r, "loss_mask", list, where)
            n = len(ids)
            if len(mask) != n:
                raise ProbeError(f"{where}: field 'loss_mask' has {len(mask)} entries for {n} tokens")
            on = [k for k, m in enumerate(mask) if m]
            if not on:
                continue
            a, b = on[0], on[-1] + 1
            if len(on) != b - a:
                multi += 1
                continue
            if a == 0:
                raise ProbeError(f"{where}: no prompt token before the first trained one")
            inf = _field(r, "inference_logprobs", list, where)
            if len(inf) != n:
                raise ProbeError(f"{where}: field 'inference_logprobs' has {len(inf)} entries for {n} tokens")
            lp = _logprob_list(inf[a:b], b - a, f"{where}: field 'inference_logprobs'")
            rewards = [x for x in (r.get("rewards") or [None] * n)[a:b] if isinstance(x, (int, float))]
            if rewards:
                reward = float(rewards[0])
            else:  # an export without rewards: the advantage's sign is what the update pushed
                adv = (r.get("advantages") or [None] * n)[a]
                if not isinstance(adv, (int, float)):
                    raise ProbeError(f"{where}: neither 'rewards' nor 'advantages' on the trained tokens")
                reward, by_adv = float(adv), by_adv + 1
            t = (r.get("temperatures") or [None] * n)[a]
            if isinstance(t, (int, float)):
                temps.add(float(t))
            if isinstance(r.get("step"), int):
                steps.add(r["step"])
            groups.setdefault(ids[:a], []).append((ids[a:b], reward, lp, str(r.get("sample_id") or "")))
    if not groups:
        raise ProbeError(f"{path}: no single-turn sequence with trained tokens")
    out = [ProbeGroup(group_id=gid, prompt_ids=prompt, response_ids=tuple(x[0] for x in items),
                      rewards=tuple(x[1] for x in items), prompt_uid=str(gid), token_origins=("exact",) * len(items),
                      logged_logprobs=tuple(x[2] for x in items) if any(x[2] is not None for x in items) else ())
           for gid, (prompt, items) in enumerate(groups.items())]
    notes = ["rewards: as logged" if not by_adv else
             f"rewards: as logged ({by_adv} responses have no reward in the export: their advantage is used)"]
    if multi:
        notes.append(f"dropped {multi} multi-turn sequences (untrained tokens inside the response)")
    if len(temps) > 1:
        notes.append(f"several sampling temperatures {sorted(temps)}: the fidelity probe uses the first")
    one = steps.pop() if len(steps) == 1 else None
    ps = ProbeSet(tuple(out), source=str(path), step=one, notes=tuple(notes), kind="prime_rl_tokens",
                  sampler_step=one, logprob_temperature=min(temps) if temps else None)
    return replace(ps, notes=_token_notes(ps, {}))


def _sample_for_probe_set(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[Sequence[int]], *, n: int,
                          max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                          batch_size: int = 16) -> list[list[list[int]]]:
    """``n`` sampled responses (token ids, cut after EOS, EOS kept) per prompt, by the core sampler
    (:func:`resrl_analysis.sampling.sample_prompts`): pure sampling, batched over prompts, prompt ``i``
    driven by its own generator seeded from ``(seed, i)``, so a prompt's responses do not depend on its
    neighbours; the global RNG is left untouched."""
    import numpy as np

    from .sampling import eos_token_ids, sample_prompts

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(len(prompts))]
    was = model.training
    model.eval()
    try:
        return sample_prompts(model, [list(p) for p in prompts], n, seeds, max_new_tokens=max_new_tokens,
                              temperature=temperature, eos_token_id=eos_token_ids(model, tokenizer),
                              pad_token_id=pad, max_batch_rows=batch_size * n)
    finally:
        model.train(was)


def from_dataset(path: str | Path, tokenizer: Any, model: PreTrainedModel | str | Path, *,
                 answer_column: str = "solution", n_samples: int = 8, max_new_tokens: int = 256,
                 temperature: float = 1.0, seed: int = 0, max_prompts: int | None = 64,
                 reward_fn: Callable[[str, str], float] | None = None) -> ProbeSet:
    """An RLVR dataset (verl's or TRL's layout): ``n_samples`` responses per prompt sampled with
    ``model`` (a loaded model or a checkpoint path: the base policy) and scored with the task reward
    against the ground truth (``reward_model.ground_truth``, else ``answer_column``)."""
    path = Path(path)
    rows = _read_rows(path)[: max_prompts or None]
    if isinstance(model, (str, Path)):
        from .checkpoints import load_checkpoint

        model = load_checkpoint(model, tokenizer=False).model
    items = []
    for where, r in rows:
        if "prompt" not in r:
            raise ProbeError(f"{where}: missing field 'prompt'")
        gt = r["reward_model"].get("ground_truth") if isinstance(r.get("reward_model"), dict) else None
        gt = gt if gt is not None else r.get(answer_column, r.get("ground_truth"))
        if gt is None:
            raise ProbeError(f"{where}: no ground truth (reward_model.ground_truth or {answer_column!r})")
        try:
            text, templated = render_prompt(tokenizer, r["prompt"])
        except ProbeError as e:
            raise ProbeError(f"{where}: {e}") from None
        items.append((where, r, text, encode_prompt(tokenizer, text, templated=templated), str(gt)))
    samples = _sample_for_probe_set(model, tokenizer, [it[3] for it in items], n=n_samples,
                                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    eos = tokenizer.eos_token_id
    groups, fns, dropped = [], {}, 0
    for gid, ((_, r, text, pids, gt), resp) in enumerate(zip(items, samples)):
        ds = str(r.get("data_source", ""))
        fn = reward_fn or fns.setdefault(ds, default_reward_fn(ds))
        kept = [x for x in resp if x]
        dropped += len(resp) - len(kept)
        if not kept:
            continue
        texts = [tokenizer.decode([t for t in x if t != eos], skip_special_tokens=True) for x in kept]
        extra = r.get("extra_info") if isinstance(r.get("extra_info"), dict) else {}
        uid = r.get("uid", extra.get("index"))
        groups.append(ProbeGroup(group_id=gid, prompt_ids=pids, response_ids=tuple(tuple(x) for x in kept),
                                 rewards=tuple(float(fn(t, gt)) for t in texts), prompt=text, responses=tuple(texts),
                                 ground_truth=gt, prompt_uid=str(uid if uid is not None else gid), data_source=ds))
    if not groups:
        raise ProbeError(f"{path}: sampling gave no response with tokens")
    names = sorted({getattr(f, "__name__", repr(f)) for f in ([reward_fn] if reward_fn else fns.values())})
    notes = [f"rewards: recomputed with {','.join(names)}",
             f"sampled {n_samples} per prompt at temperature {temperature}, seed {seed}"]
    if dropped:
        notes.append(f"dropped {dropped} empty responses")
    return ProbeSet(groups=tuple(groups), source=str(path), step=None, notes=tuple(notes), kind="dataset")


# ----------------------------------------------------------------------------- the run's own prompts


def _run_setting(run_dir: Path, key: str, default: Any) -> Any:
    """One field of the run's config.yaml (``default`` when the file or the field is missing)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / rundir.CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return default
    v = cfg.get(key, default) if isinstance(cfg, dict) else default
    return default if v is None else v


def from_run_prompts(run_dir: str | Path, which: str, tokenizer: Any, model: PreTrainedModel | str | Path, *,
                     n_samples: int | None = None, max_new_tokens: int | None = None,
                     temperature: float | None = None, seed: int = 0) -> ProbeSet:
    """The ``heldout`` or ``train`` probe set of one of our runs, from ``RUN_DIR/prompts/<which>.jsonl``.

    Each prompt's group is its reference response (the task's correct response, reward 1) followed by
    ``n_samples`` responses sampled by ``model`` (the starting policy: the step-0 checkpoint) through the core
    sampler, scored against the ground truth by the reward the trainer used for the prompt's data source
    (:func:`resrl_analysis.rewards.default_reward_fn`). Defaults come from the run's
    config.yaml: ``n`` samples at the training ``temperature``, at most ``max_response_length`` tokens.

    Raises:
        ProbeError: the run has no such file (written by runs before it existed: give ``--probe-set FILE``).
    """
    if which not in ("heldout", "train"):
        raise ProbeError(f"probe set {which!r}: expected 'heldout' or 'train'")
    run_dir = Path(run_dir)
    path = run_dir / (rundir.PROMPTS_HELDOUT if which == "heldout" else rundir.PROMPTS_TRAIN)
    if not path.is_file():
        raise ProbeError(f"{path}: not found; this run did not write its prompt files (older trainer, or "
                         "probe_prompts=0): give --probe-set FILE")
    rows = _read_jsonl(path)
    if not rows:
        raise ProbeError(f"{path}: no prompts")
    for i, obj in rows:
        missing = [k for k in ("uid", "prompt_ids", "ground_truth", "reference_ids") if k not in obj]
        if missing:
            raise ProbeError(f"{path}:{i}: missing field(s) {missing}")
    n = int(n_samples if n_samples is not None else _run_setting(run_dir, "n", 8))
    temp = float(temperature if temperature is not None else _run_setting(run_dir, "temperature", 1.0))
    longest = max(len(obj["reference_ids"]) for _, obj in rows)
    m = int(max_new_tokens if max_new_tokens is not None else _run_setting(run_dir, "max_response_length", longest))
    if isinstance(model, (str, Path)):
        from .checkpoints import load_checkpoint

        model = load_checkpoint(model, tokenizer=False).model
    samples = _sample_for_probe_set(model, tokenizer, [obj["prompt_ids"] for _, obj in rows], n=n,
                                    max_new_tokens=m, temperature=temp, seed=seed) if n > 0 else [[] for _ in rows]
    eos = tokenizer.eos_token_id
    groups, names, dropped = [], set(), 0
    for gid, ((_, obj), resp) in enumerate(zip(rows, samples)):
        ds = str(obj.get("data_source", ""))
        fn = default_reward_fn(ds)
        names.add(fn.__name__)
        kept = [tuple(x) for x in resp if x]
        dropped += len(resp) - len(kept)
        texts = [tokenizer.decode([t for t in x if t != eos], skip_special_tokens=True) for x in kept]
        ref_text = str(obj.get("reference_response", obj["ground_truth"]))
        groups.append(ProbeGroup(
            group_id=gid, prompt_ids=tuple(obj["prompt_ids"]),
            response_ids=(tuple(obj["reference_ids"]), *kept),
            rewards=(1.0, *(float(fn(x, obj["ground_truth"])) for x in texts)),
            prompt=str(obj.get("prompt", "")), responses=(ref_text, *texts), ground_truth=str(obj["ground_truth"]),
            prompt_uid=str(obj["uid"]), data_source=ds))
    notes = [f"rewards: recomputed with {','.join(sorted(names))} (the task's reward against the ground truth, "
             "as the trainer scored it; the reference response counts as correct)",
             f"{which}: {len(groups)} prompts of {path.name}, each with its reference response and {n} responses "
             f"sampled by the starting policy at temperature {temp}, seed {seed}"]
    if dropped:
        notes.append(f"dropped {dropped} empty responses")
    return ProbeSet(groups=tuple(groups), source=str(path), step=0, notes=tuple(notes), kind="run_prompts")


# ----------------------------------------------------------------------------- one entry point


def load_probe_set(
    source: str | Path | ProbeSet,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    model: PreTrainedModel | str | Path | None = None,
    step: int | None = None,
    answer_column: str = "solution",
    reward_column: str | None = None,
    n_samples: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    rescore: bool = False,
    max_completion_length: int | None = None,
) -> ProbeSet:
    """Read a probe set in any format of the module docstring (a loaded :class:`ProbeSet` passes through).

    Args:
        source: a file, or a directory of dumps (TRL ``completions/``, verl ``rollout_data_dir``,
            our ``rollouts/``): its dump for ``step``, default the oldest.
        tokenizer: encodes text formats (the checkpoints' tokenizer).
        model: the policy that samples a dataset's responses (a checkpoint path or a loaded model).
        answer_column: a TRL-layout dataset's ground-truth column.
        reward_column: a TRL completion log's reward column (default: the sum of all).
        rescore: recompute logged rewards with the task's reward wherever a ground truth is known (default: the
            logged reward, what the run optimised).
        max_completion_length: the run's response length limit, for text logs (TRL's is read from its
            ``training_args.bin``): a response of that many tokens ended by length and gets no EOS.

    Raises:
        ProbeError: an unreadable file or unknown format (one line naming the file and row).
    """
    if isinstance(source, ProbeSet):
        return source
    src = Path(source)
    if src.is_dir() and (src.name == "token_exports" or src.name.startswith("step_") or any(src.glob("step_*/rank_*"))
                         or any(src.glob("rank_*.jsonl"))):
        return from_prime_rl_tokens(src, step=step)
    path = _pick_file(src, step)
    if not path.is_file():
        raise ProbeError(f"{path}: probe-set file not found")
    fmt = detect_format(path, answer_column=answer_column)
    if fmt == "rollouts":
        return ProbeSet.from_rollouts(path)
    if fmt == "jsonl":
        return _from_user_jsonl(path, tokenizer)
    if fmt == "trl_completions":
        return from_trl_completions(path, tokenizer, reward_column=reward_column, rescore=rescore,
                                    max_completion_length=max_completion_length)
    if fmt == "verl_rollouts":
        return from_verl_rollouts(path, tokenizer, rescore=rescore, max_completion_length=max_completion_length)
    if fmt == "prime_rl_tokens":
        return from_prime_rl_tokens(path)
    if model is None:
        raise ProbeError(f"{path}: a dataset probe set samples responses: give the base model (--base-model)")
    if tokenizer is None:
        raise ProbeError(f"{path}: a dataset probe set needs a tokenizer")
    return from_dataset(path, tokenizer, model, answer_column=answer_column, n_samples=n_samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
