"""Shared fixtures of the linear-family tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The float64 references are thousands of tiny ops: one intra-op thread runs them far faster on CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
