import os

import torch

# Triton kernels run on CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _interp_speed import overflow_checks, patch_language_once  # noqa: E402

patch_language_once()
overflow_checks(os.environ.get("ATTNZOO_TEST_OVERFLOW_CHECKS") == "1")  # (tests/_interp_speed.py says why)

# Two tiers. `make test` (CI, 2 CPU cores) runs every kernel path and option at least once; cases marked
# `full` are further combinations of options already covered there (a second length, gate strength or tile for the
# same code path) and run with `make test-full` (ATTNZOO_TESTS=full), and on the GPU machine, where they are cheap.
FULL = os.environ.get("ATTNZOO_TESTS") == "full" or torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a further combination of options covered elsewhere; "
                                       "runs with `make test-full` (ATTNZOO_TESTS=full) or on a GPU")


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="a further combination: `make test-full` (ATTNZOO_TESTS=full) runs it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.fixture
def torch_layouts(monkeypatch):
    """For tests of host-side planning at long lengths (8K-16K tokens): block layouts from the PyTorch ops instead of
    the fused layout kernel under Triton's interpreter (test_gluon_narrow_fold at 8K: 7.5 s -> 1.2 s a case;
    2026-12-08, 2-core machine). The two give the same lists
    (tests/backends/test_triton_band_layout.py); the kernel's own runs are tested there and in every interpreted
    attention call. The Triton backend's cached plans are dropped before and after, so no other test sees them."""
    pytest.importorskip("triton")
    from attnzoo.backends.triton import ops

    def clear():
        for obj in vars(ops).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()

    clear()
    monkeypatch.setattr(ops, "_band_kernel", lambda pattern, device: False)
    yield ops
    clear()
