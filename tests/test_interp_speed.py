"""tests/_interp_speed.py: the interpreter patches triton.language once per launch, and still restores it after."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("only with Triton's CPU interpreter", allow_module_level=True)

import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as ti  # noqa: E402


@triton.jit
def _row_sum(x):
    return tl.sum(x, axis=0)


@triton.jit
def _kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    acc = tl.zeros([N], tl.float32) + tl.load(x_ptr + offs)
    tl.store(out_ptr + tl.program_id(0), _row_sum(acc * 2.0))


@triton.jit
def _plain(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


def test_helpers_do_not_patch_again(monkeypatch):
    """Attributes swapped during a launch: a kernel calling @triton.jit helpers in each of its 8 programs swaps no
    more than one launch's worth again (triton.language.core, which tl.zeros's module sees), not once per call."""
    swaps = [0]
    set_attr = ti._LangPatchScope.set_attr

    def counting(self, *a):
        swaps[0] += 1
        return set_attr(self, *a)

    monkeypatch.setattr(ti._LangPatchScope, "set_attr", counting)
    x, out = torch.randn(16), torch.empty(16)
    _plain[(8,)](x, out, N=16)
    plain, swaps[0] = swaps[0], 0
    _kernel[(8,)](x, out, N=16)
    assert plain > 0 and swaps[0] < 2 * plain, (plain, swaps[0])


def test_launch_restores_the_language(monkeypatch):
    """The speed-up is installed, a kernel with helpers computes the right values, every launch and helper still goes
    through the patching, and triton.language is restored after each launch."""
    assert getattr(ti._patch_lang, "_attnzoo_once", False), "conftest did not install patch_language_once"
    before = {n: getattr(tl, n) for n in ("zeros", "sum", "load", "store", "arange")}
    calls = []
    inner = ti._patch_lang
    monkeypatch.setattr(ti, "_patch_lang", lambda fn: calls.append(fn.__name__) or inner(fn))
    x, out = torch.randn(16), torch.empty(3)
    for _ in range(2):
        _kernel[(3,)](x, out, N=16)
        torch.testing.assert_close(out, (2 * x).sum().expand(3))
    assert {n: getattr(tl, n) for n in before} == before, "the launch left triton.language patched"
    assert calls.count("_kernel") == 2 and "_row_sum" in calls
