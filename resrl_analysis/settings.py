"""The error of an impossible hyper-parameter, raised by the typed settings dataclasses of the core.

A settings dataclass (:class:`~resrl_analysis.weighting.ResRLWeightConfig`,
:class:`~resrl_analysis.advantages.AdvantageParams`) checks its fields once, in ``__post_init__``, and raises a
:class:`SettingError` that says which fields, their values and what they must satisfy. A caller that exposes
the same fields under other names (the trainer's flat ``resrl_rank``, ``resrl_q_low``, ...) renames them
(:meth:`SettingError.renamed`) and shows the message its users expect (:meth:`SettingError.as_setting`)
instead of checking the values a second time.

>>> err = SettingError(("rank",), (0,), "must be >= 1")
>>> str(err)
'rank must be >= 1, got 0'
>>> err.renamed({"rank": "resrl_rank"}).as_setting()
'resrl_rank=0 must be >= 1'
>>> pair = SettingError(("q_low", "q_high"), (0.8, 0.2), "must be below {1}, both in [0, 1]")
>>> str(pair)
'q_low must be below q_high, both in [0, 1], got q_low=0.8, q_high=0.2'
>>> pair.as_setting()
'q_low=0.8 must be below q_high=0.2, both in [0, 1]'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SettingError"]


class SettingError(ValueError):
    """Impossible values of one or more settings.

    Args:
        names: the fields concerned, the checked one first.
        values: their values.
        requirement: what the first field must satisfy, e.g. ``"must be >= 1"``; ``{1}`` (``{2}``, ...) stands
            for the other fields (by name in ``str()``, as ``name=value`` in :meth:`as_setting`).
        what: what kind of value the field is (``"a weight"``): :meth:`as_setting` says so.
        choices: the allowed values, in words (``"'lowrank' or 'exact'"``); then ``requirement`` is unused.
    """

    def __init__(self, names: Sequence[str], values: Sequence[Any], requirement: str = "", *,
                 what: str | None = None, choices: str | None = None) -> None:
        self.names, self.values = tuple(names), tuple(values)
        self.requirement, self.what, self.choices = requirement, what, choices
        super().__init__(self._text())

    def _text(self) -> str:
        got = (repr(self.values[0]) if len(self.names) == 1
               else ", ".join(f"{n}={v!r}" for n, v in zip(self.names, self.values)))
        if self.choices is not None:
            return f"{self.names[0]} must be {self.choices}, got {got}"
        return f"{self.names[0]} {self.requirement.format(*self.names)}, got {got}"

    def renamed(self, names: Mapping[str, str]) -> SettingError:
        """The same error with fields renamed by ``names`` (fields it lacks keep their name)."""
        return SettingError([names.get(n, n) for n in self.names], self.values, self.requirement, what=self.what,
                            choices=self.choices)

    def as_setting(self) -> str:
        """The message as a settings file or command line shows it: ``NAME=VALUE must ...``."""
        first = f"{self.names[0]}={self.values[0]!r}"
        if self.choices is not None:
            return f"{first}: choose {self.choices}"
        others = [f"{n}={v!r}" for n, v in zip(self.names, self.values)]
        kind = f"is {self.what} and " if self.what else ""
        return f"{first} {kind}{self.requirement.format(*others)}"
