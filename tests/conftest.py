"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for a module, restored afterwards: tiny models only pay thread
    start-up and contention (the CI box has 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def view_fixture_runs(tmp_path_factory):
    """Tiny probed runs for the `resrl view` tests (tests/view_runs.py): ours, a TRL layout and a verl one,
    made once per session (about 10 s) and shared by test_view.py and test_view_browser.py. Treat as read-only."""
    import view_runs

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("view-runs")
        ours = view_runs.our_run(root)
        return {"ours": ours, "trl": view_runs.trl_run(root, ours), "verl": view_runs.verl_run(root, ours)}
    finally:
        torch.set_num_threads(before)
