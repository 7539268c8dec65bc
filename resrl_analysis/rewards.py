"""The one home of the reward functions: the trainer's tasks and the probes score a response with the same code.

A probe that recomputes the reward of a response (a rollout dump with a ground truth, the run's prompt files,
the diversity probe's samples) must score it exactly as the trainer that produced the run did, so each task's
reward exists once, here, and :func:`default_reward_fn` maps a prompt's ``data_source`` to the reward its task
used:

=====================  ===========================  ====================================================
data source            reward                       correct when
=====================  ===========================  ====================================================
``multiplication``     :func:`exact_match_reward`   the response, cut at the first ``<eos>`` text and
                                                    stripped, is exactly the ground truth
``addition``           :func:`final_answer_reward`  the text after the last ``=`` of the response (cut at
                                                    the first ``<eos>``, stripped) is exactly the ground
                                                    truth
anything else          :func:`math_verify_reward`   math-verify judges the final answer equal (a math
(a file's, ``""``)                                  task's own data source; a foreign dump's)
=====================  ===========================  ====================================================

Every reward is 0 for an empty answer, and for a ground truth that is empty or that math-verify cannot parse.
The trainer decodes responses without special tokens, so the EOS is usually absent from the text; the cut at
``<eos>`` makes a text that kept it (``skip_special_tokens=False``, a foreign dump) score the same.

The length-scaled reward of the ResRL paper (:func:`length_scale_reward`) lives here too. Module-level
imports are numpy and the standard library (torch is used only on tensors handed in).

>>> exact_match_reward("1081<eos>", "1081"), final_answer_reward("7+5=12;=12<eos>=5", "12")
(1.0, 1.0)
>>> math_verify_reward("so the answer is $\\\\boxed{\\\\frac{1}{2}}$", "0.5")
1.0
>>> float(length_scale_reward(1.0, 3798, length_start=3500, max_length=4096, end_scale=0.7))
0.85
>>> default_reward_fn("addition") is final_answer_reward
True
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "EOS_TEXT",
    "RewardFn",
    "TASK_REWARDS",
    "default_reward_fn",
    "exact_match_reward",
    "final_answer_reward",
    "length_scale_reward",
    "math_verify_reward",
]

#: The end-of-sequence token's text in the embedded tasks' tokenizer: a response is cut there.
EOS_TEXT = "<eos>"

#: ``reward(response_text, ground_truth) -> float``; a response is correct when its reward is > 0.
RewardFn = Callable[[str, str], float]


def exact_match_reward(response_text: str, ground_truth: str, eos_text: str = EOS_TEXT) -> float:
    """1.0 iff the response, cut at the first ``eos_text`` and stripped, equals the stripped ground truth.

    Works on responses decoded with or without special tokens (without them, the EOS is simply
    absent). An empty response is never correct.

    >>> exact_match_reward(" 42 ", "42"), exact_match_reward("421", "42"), exact_match_reward("", "")
    (1.0, 0.0, 0.0)
    """
    answer = response_text.split(eos_text, 1)[0].strip()
    gold = ground_truth.strip()
    return float(bool(answer) and answer == gold)


def final_answer_reward(response_text: str, ground_truth: str, eos_text: str = EOS_TEXT) -> float:
    """1.0 iff the response's final answer, the text after its last ``=`` (the whole response when it has none),
    is exactly the ground truth, after cutting the response at the first ``eos_text`` and stripping both: the
    addition task's rule (a worked solution ``7+5=12;4+8+1=13;3+2+1=6;=632``). The steps are not checked.

    >>> final_answer_reward("7+5=12;4+8+1=13;=132", "132"), final_answer_reward(" 1081", "1081")
    (1.0, 1.0)
    >>> final_answer_reward("7+5=12;=13", "132"), final_answer_reward("632=", "632"), final_answer_reward("", "")
    (0.0, 0.0, 0.0)
    """
    answer = response_text.split(eos_text, 1)[0].rsplit("=", 1)[-1].strip()
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

    The gold answer is parsed first, then the response; ``verify(gold, answer)`` is not symmetric
    and expects this order. math-verify's timeouts use ``signal.alarm``, which raises outside the main
    thread; there the timeouts are switched off (a pathological input can then take long: run
    rewards in worker *processes* if that matters). In the main thread ``timeout_seconds`` applies.

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


#: The embedded tasks' rewards by data source; every other source is a math task (:func:`math_verify_reward`).
TASK_REWARDS: dict[str, RewardFn] = {"multiplication": exact_match_reward, "addition": final_answer_reward}


def default_reward_fn(data_source: str = "") -> RewardFn:
    """The reward the trainer used for prompts of ``data_source``: :data:`TASK_REWARDS` for the embedded tasks,
    :func:`math_verify_reward` for any other source (a math task's, or an empty one: a foreign dump's).

    >>> default_reward_fn("multiplication") is exact_match_reward, default_reward_fn("openai/gsm8k").__name__
    (True, 'math_verify_reward')
    """
    return TASK_REWARDS.get(data_source, math_verify_reward)


def length_scale_reward(reward: Any, length: Any, length_start: int, max_length: int, end_scale: float = 0.7) -> Any:
    """Scale positive rewards down for long responses (the ResRL paper's length penalty).

    A positive reward is kept whole up to ``length_start`` response tokens, then multiplied by a
    factor falling linearly to ``end_scale`` at ``max_length`` (and staying there beyond). Zero and
    negative rewards are returned unchanged. Broadcasts over tensors (result is a float tensor on
    the reward's device), numpy arrays, or Python numbers (result is a numpy float).

    Args:
        reward: rewards, any shape.
        length: response lengths in tokens, broadcastable against ``reward``.
        length_start: last length with the full reward (3500 in the paper).
        max_length: length at which the factor reaches ``end_scale`` (4096 in the paper).
        end_scale: the factor at ``max_length``, in [0, 1] (0.7 in the paper).

    >>> length_scale_reward(np.array([1.0, 1.0, 1.0, -1.0]), np.array([10, 15, 30, 30]), 10, 20, 0.5)
    array([ 1.  ,  0.75,  0.5 , -1.  ])
    """
    if not max_length > length_start >= 0:
        raise ValueError(f"need 0 ≤ length_start < max_length, got {length_start}, {max_length}")
    if not 0.0 <= end_scale <= 1.0:
        raise ValueError(f"end_scale must be in [0, 1], got {end_scale}")
    span = float(max_length - length_start)
    # A tensor exists only once torch is imported: look it up there rather than import torch for numpy callers.
    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(reward, torch.Tensor) or isinstance(length, torch.Tensor)):
        r = torch.as_tensor(reward)
        r = r if r.is_floating_point() else r.float()
        n = torch.as_tensor(length, device=r.device).to(r.dtype)
        frac = ((n - length_start) / span).clamp(0.0, 1.0)
        return torch.where(r > 0, r * (1.0 - (1.0 - end_scale) * frac), r)
    r_np = np.asarray(reward, dtype=np.float64)
    frac_np = np.clip((np.asarray(length, dtype=np.float64) - length_start) / span, 0.0, 1.0)
    return np.where(r_np > 0, r_np * (1.0 - (1.0 - end_scale) * frac_np), r_np)
