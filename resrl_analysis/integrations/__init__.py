"""Callbacks that run the probes inside other trainers (TRL first: :mod:`.trl`).

Import the submodule you need (``from resrl_analysis.integrations.trl import ProbeCallback``);
this package imports nothing heavy itself.
"""

__all__: list[str] = []
