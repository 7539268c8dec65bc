"""Root conftest: names available to every docstring example (doctests run over resrl_analysis/ and trainer/)."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["np"] = np
