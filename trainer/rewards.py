"""Reward functions: exact match (tiny task), math-verify (math data), and the length scale.

>>> exact_match_reward("1081<eos>", "1081")
1.0
>>> math_verify_reward("so the answer is $\\\\boxed{\\\\frac{1}{2}}$", "0.5")
1.0
>>> float(length_scale_reward(1.0, 3798, length_start=3500, max_length=4096, end_scale=0.7))
0.85
"""

from __future__ import annotations

import threading
from typing import TypeVar

import numpy as np
import torch

EOS_TEXT = "<eos>"

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray, float)


def exact_match_reward(response_text: str, ground_truth: str, eos_text: str = EOS_TEXT) -> float:
    """1.0 iff the response, cut at the first `eos_text` and stripped, equals the stripped ground truth.

    Works on responses decoded with or without special tokens (without them, the EOS is simply
    absent). An empty response is never correct.

    >>> exact_match_reward(" 42 ", "42"), exact_match_reward("421", "42"), exact_match_reward("", "")
    (1.0, 0.0, 0.0)
    """
    answer = response_text.split(eos_text, 1)[0].strip()
    gold = ground_truth.strip()
    return float(bool(answer) and answer == gold)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _gold_text(ground_truth: str) -> str:
    # A bare ground truth ("\\frac{1}{2}", "72") has no LaTeX delimiters, which math-verify's LaTeX
    # extractor needs; wrapping it in \boxed{} makes it parse as LaTeX and as a plain number.
    if "\\boxed" in ground_truth or "$" in ground_truth:
        return ground_truth
    return f"\\boxed{{{ground_truth}}}"


def math_verify_reward(response_text: str, ground_truth: str, timeout_seconds: int | None = 5) -> float:
    """1.0 iff math-verify judges the response's final answer equal to the ground truth.

    The gold answer is parsed first, then the response; `verify(gold, answer)` is not symmetric
    and expects this order. math-verify's timeouts use `signal.alarm`, which raises outside the main
    thread; there the timeouts are switched off (a pathological input can then take long: run
    rewards in worker *processes* if that matters). In the main thread `timeout_seconds` applies.

    >>> math_verify_reward("I think it is 72.", "72"), math_verify_reward("\\\\boxed{71}", "72")
    (1.0, 0.0)
    """
    from math_verify import parse, verify  # imported lazily: it pulls in sympy (~1 s)

    timeout = timeout_seconds if _in_main_thread() else None
    gold = parse(_gold_text(ground_truth), parsing_timeout=timeout)
    if not gold:
        return 0.0
    answer = parse(response_text, parsing_timeout=timeout)
    if not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=timeout))


def length_scale_reward(
    reward: ArrayLike,
    length: ArrayLike,
    length_start: int,
    max_length: int,
    end_scale: float = 0.7,
) -> ArrayLike:
    """Scale positive rewards down for long responses (the ResRL paper's length penalty).

    A positive reward is kept whole up to `length_start` response tokens, then multiplied by a
    factor falling linearly to `end_scale` at `max_length` (and staying there beyond). Zero and
    negative rewards are returned unchanged. Broadcasts over tensors (result is a float tensor on
    the reward's device), numpy arrays, or Python numbers (result is a numpy float).

    Args:
        reward: rewards, any shape.
        length: response lengths in tokens, broadcastable against `reward`.
        length_start: last length with the full reward (3500 in the paper).
        max_length: length at which the factor reaches `end_scale` (4096 in the paper).
        end_scale: the factor at `max_length`, in [0, 1] (0.7 in the paper).

    >>> length_scale_reward(np.array([1.0, 1.0, 1.0, -1.0]), np.array([10, 15, 30, 30]), 10, 20, 0.5)
    array([ 1.  ,  0.75,  0.5 , -1.  ])
    """
    if not max_length > length_start >= 0:
        raise ValueError(f"need 0 ≤ length_start < max_length, got {length_start}, {max_length}")
    if not 0.0 <= end_scale <= 1.0:
        raise ValueError(f"end_scale must be in [0, 1], got {end_scale}")
    span = float(max_length - length_start)
    if isinstance(reward, torch.Tensor) or isinstance(length, torch.Tensor):
        r = torch.as_tensor(reward)
        r = r if r.is_floating_point() else r.float()
        n = torch.as_tensor(length, device=r.device).to(r.dtype)
        frac = ((n - length_start) / span).clamp(0.0, 1.0)
        return torch.where(r > 0, r * (1.0 - (1.0 - end_scale) * frac), r)
    r_np = np.asarray(reward, dtype=np.float64)
    frac_np = np.clip((np.asarray(length, dtype=np.float64) - length_start) / span, 0.0, 1.0)
    return np.where(r_np > 0, r_np * (1.0 - (1.0 - end_scale) * frac_np), r_np)
