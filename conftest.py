"""Root conftest: names available to every docstring example (doctests run over resrl_analysis/ and trainer/)."""

import os

import numpy as np
import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs 2 workers) each worker takes its share of the cores for torch's
    intra-op threads: two workers with a thread per core each would fight over the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
