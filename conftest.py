"""Root conftest: names available to every docstring example (doctests run over resrl_analysis/ and trainer/)."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["np"] = np


TIERS = ("unit", "integration", "e2e")
# Docstring examples are unit tests, but these train or probe a model end to end: integration.
HEAVY_DOCTESTS = ("trainer/__init__.py", "trainer/loop.py", "trainer/demo.py", "trainer/study.py")


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier marker (unit, integration, e2e), so `pytest -m unit` is the fast tier
    and nothing falls between tiers; docstring examples get theirs here."""
    wrong = []
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            path = item.path.relative_to(config.rootpath).as_posix()
            item.add_marker("integration" if path in HEAVY_DOCTESTS else "unit")
            continue
        tiers = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError("tests need exactly one tier marker (unit, integration or e2e):\n  "
                                + "\n  ".join(wrong))
