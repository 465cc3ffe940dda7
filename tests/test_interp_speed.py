"""tests/_interp_speed.py: the interpreter patches triton.language once per launch, and still restores it after; its
int32 overflow sanitizer is off, and on with debug inside `overflow_checked`."""
import dataclasses
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


@triton.jit
def _scaled_index(x_ptr, out_ptr, K):
    i = tl.program_id(0)
    tl.store(out_ptr + i, tl.load(x_ptr + i) + ((i + 1) * K) // K)


def test_overflow_checks_are_off_and_a_block_turns_them_on():
    """conftest turns the interpreter's int32 overflow sanitizer off: without debug its comparisons are never read, so
    an overflow wraps around either way. Inside `overflow_checked` (debug and the sanitizer on) (i + 1) * K past 2^31
    raises."""
    from _interp_speed import overflow_checked

    opts = ti.interpreter_builder.options
    assert opts.sanitize_overflow is (opts.debug or os.environ.get("ATTNZOO_TEST_OVERFLOW_CHECKS") == "1")
    x, out = torch.zeros(4, dtype=torch.int32), torch.empty(4, dtype=torch.int32)
    _scaled_index[(4,)](x, out, 1000)
    assert out.tolist() == [1, 2, 3, 4]
    if not opts.debug:
        ti.interpreter_builder.options = dataclasses.replace(opts, sanitize_overflow=True)
        try:  # the sanitizer alone, as the interpreter runs by default: the overflow is not reported
            _scaled_index[(4,)](x, out, 2**30)
        finally:
            ti.interpreter_builder.options = opts
    with overflow_checked() as on:
        assert on and ti.interpreter_builder.options.sanitize_overflow and ti.interpreter_builder.options.debug
        with pytest.raises(Exception, match="int32 overflow"):  # (the interpreter wraps the AssertionError)
            _scaled_index[(4,)](x, out, 2**30)
    assert ti.interpreter_builder.options == opts


@pytest.mark.parametrize("case", ["window-sinks-gqa", "nbhd2d", "decode"])
def test_attention_kernels_pass_the_overflow_sanitizer(case):
    """A few of attnzoo's attention kernels (forward, backward, lse; a neighborhood in tile order; split-K decode)
    with the interpreter's debug asserts and int32 overflow sanitizer on, against the float64 reference."""
    import attnzoo as az
    from attnzoo.backends import reference_attention
    from attnzoo.testing import check_close
    from _interp_speed import overflow_checked

    pattern, lq, lk, hq, hkv = {"window-sinks-gqa": (az.SlidingWindow(20) | az.Sinks(3), 72, 72, 4, 2),
                                "nbhd2d": (az.Neighborhood((3, 5), grid=(8, 16)), 128, 128, 2, 1),
                                "decode": (az.Causal(), 1, 150, 4, 2)}[case]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, n, 32, generator=g, dtype=torch.float64) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    w = torch.randn(1, hq, lq, 32, generator=g, dtype=torch.float64)
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    grad = case != "decode"
    qt, kt, vt = (t.float().requires_grad_(grad) for t in (q, k, v))
    with overflow_checked():
        out, lse = az.attention(qt, kt, vt, pattern, backend="triton", return_lse=True)
        check_close("out", out, ref_o)
        check_close("lse", lse, ref_l)
        if grad:
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            ref = torch.autograd.grad((reference_attention(qr, kr, vr, pattern)[0] * w).sum(), (qr, kr, vr))
            got = torch.autograd.grad((out.double() * w).sum(), (qt, kt, vt))
            for name, a, b in zip(("dq", "dk", "dv"), got, ref):
                check_close(name, a, b)
