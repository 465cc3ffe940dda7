"""The split-K decode kernel for wide heads (`attn_decode_wide`: D chunked for the scores, Dv sliced for the
output; MLA's absorbed decode has one latent kv head with D=576, Dv=512) against the float64 reference,
run by Triton's CPU interpreter: Lq 1 and 3, GQA groups 1..4, batch 2, full and causal (and a masked
window), several split counts and Dv slices, fp32 and fp16; outputs are poisoned with NaN before each
launch. Also the Triton backend's routing: MLA's folded one-token call reaches the decode kernel, wide
heads outside the decode route are declined with a reason, and `auto` prefers triton for them on CUDA."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.base import Request
from attnzoo.testing import check_close

from common import dense, inputs

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import TritonBackend  # noqa: E402
from attnzoo.backends.triton import decode as dec  # noqa: E402

PATTERNS = {"full": lambda: None, "causal": lambda: az.Causal(), "sinks+window": lambda: az.SlidingWindow(20) | az.Sinks(3)}


def _check(pattern, shape, dtype=torch.float32, seed=0, **kw):
    q, k, v = (t.detach() for t in inputs(*shape, seed=seed))
    ref_o, ref_l = reference_attention(q, k, v, pattern)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    out, lse = dec.attention_decode(ql, kl, vl, pattern, shape[5] ** -0.5, poison=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == ref_o.shape
    base = dense(ql, kl, vl, pattern)[0] if dtype != torch.float32 else None
    check_close("out", out, ref_o, baseline=base)
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "lse: -inf rows differ"
    fin = torch.isfinite(ref_l)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse[fin].double(), ref_l[fin].double(), rtol=tol, atol=tol)
    return out, lse


@pytest.mark.parametrize("pname", ["full", "causal"])
@pytest.mark.parametrize("d, dv", [(576, 512), (320, 192)])
@pytest.mark.parametrize("lq, hq, hkv, lk", [(1, 1, 1, 100), (3, 4, 1, 181), (1, 8, 2, 263), (3, 2, 2, 300)])
def test_wide_heads_match_reference(pname, d, dv, lq, hq, hkv, lk):
    _check(PATTERNS[pname](), (2, hq, hkv, lq, lk, d, dv), seed=d + lq + lk)


@pytest.mark.parametrize("num_splits, block_dv, block_dc", [(1, 128, 64), (3, 256, 32), (7, None, 128)])
def test_dv_slices_splits_and_d_chunks(num_splits, block_dv, block_dc):
    """One split (the kernel writes the result) and several (merged by lse, splits with no block among
    them), the output in 4, 2 or 1 Dv slices, D in chunks of 32..128 (576 = 4.5 x 128: a ragged chunk)."""
    _check(az.Causal(), (2, 4, 1, 3, 150, 576, 512), num_splits=num_splits, block_dv=block_dv, block_dc=block_dc,
           seed=num_splits)


def test_group_cut_into_chunks():
    """16 heads x 3 queries = 48 rows > 32 rows a program: two chunks of 10 heads (plus a partial one)."""
    _check(az.Causal(), (2, 16, 1, 3, 90, 320, 192), num_splits=2, seed=5)
    plan = dec.decode_plan(az.Causal(), 3, 90, 16, 16, 1, "cpu", dec.WIDE_MAX_ROWS)
    assert (plan.chunks, plan.heads_per_chunk) == (2, 10)


def test_masked_pattern_and_fully_masked_rows():
    """A pattern needing the generated mask on wide heads; Lq > Lk causal rows that see no key (0, -inf)."""
    _check(PATTERNS["sinks+window"](), (2, 4, 2, 3, 120, 320, 192), num_splits=3, seed=3)
    out, lse = _check(az.Causal(), (1, 2, 1, 5, 3, 320, 192), block_dv=64, num_splits=2, seed=4)
    assert torch.all(torch.isneginf(lse[:, :, :2])) and torch.all(out[:, :, :2] == 0)


def test_fp16():
    # (bf16 is checked on the GPU by benchmarks/triton_decode_bench.py: Triton's CPU interpreter gives garbage
    # for bf16 tensors, for the narrow decode kernel as well)
    _check(az.Causal(), (2, 4, 1, 3, 140, 576, 512), torch.float16, seed=7, num_splits=2)


def test_wide_kernel_on_narrow_heads():
    """``wide=True`` runs the chunked kernel on ordinary head dims too (same results as the narrow one)."""
    _check(az.Causal(), (2, 4, 2, 3, 90, 96, 80), wide=True, block_dc=32, block_dv=32, num_splits=2, seed=9)


def _mla_call_inputs(b=2, h=32, s=150, rank=512, rope=64, seed=0):
    """What MLA's absorbed one-token decode passes to attention(): q (B, 1, H, rank + rope) (heads folded into
    the query axis, a transposed view), one latent key head (B, 1, S, rank + rope) and V = its first ``rank``
    columns (a strided view of the same memory)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, rank + rope, generator=gen).transpose(1, 2)
    latent = torch.randn(b, s, rank + rope, generator=gen)
    return q, latent[:, None], latent[:, None, :, :rank]


def test_mla_folded_call_routes_to_decode(monkeypatch):
    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q, k, v = _mla_call_inputs()
    scale = 0.1
    with torch.no_grad():
        out = az.attention(q, k, v, None, scale=scale, backend="triton")
    assert len(calls) == 1
    ref = reference_attention(q.double(), k.double(), v.double(), None, scale)[0]
    check_close("out", out, ref)
    # more folded heads than a program has rows: unfolded back into heads, one query each
    q, k, v = _mla_call_inputs(b=1, h=80, s=70, rank=256, rope=64, seed=1)
    out, lse = real(q, k, v, None, scale, poison=True)
    ref_o, ref_l = reference_attention(q.double(), k.double(), v.double(), None, scale)
    check_close("out", out, ref_o)
    torch.testing.assert_close(lse.double(), ref_l.double(), rtol=1e-5, atol=1e-5)


class _Fake:
    """Shape/dtype/device stand-in for a tensor, to ask the backends about a CUDA request on a CPU box."""
    def __init__(self, *shape, device="cuda", requires_grad=False):
        self.shape, self.device, self.dtype = torch.Size(shape), torch.device(device), torch.bfloat16
        self.requires_grad = requires_grad


def _req(lq, hq=32, hkv=1, d=576, dv=512, pattern=None, device="cuda", grad=False, lse=False):
    q = _Fake(8, hq, lq, d, device=device, requires_grad=grad)
    return Request(q, _Fake(8, hkv, 32768, d, device=device), _Fake(8, hkv, 32768, dv, device=device), pattern,
                   d ** -0.5, lse)


def test_can_run_reasons_for_wide_heads():
    tb = TritonBackend()
    assert tb.can_run(_req(1))[0] and tb.can_run(_req(3, pattern=az.Causal()))[0]
    assert tb.can_run(_req(32, hq=1))[0]  # MLA's folded call: full attention, 32 rows
    for req, words in ((_req(1, grad=True), "grad"), (_req(40, pattern=az.Causal()), "Lq=40"),
                       (_req(512, hq=1), "Lq=512")):
        ok, why = tb.can_run(req)
        assert not ok and "split-K decode" in why and words in why, why
    ok, why = tb.can_run(_req(1, d=1088))
    assert not ok and "1024" in why
    ok, why = tb.can_run(_req(64, hq=8, hkv=8, d=128, dv=128, pattern=az.Causal(), grad=True))
    assert ok, why  # ordinary heads: the training kernels


def test_auto_prefers_triton_for_wide_decode_on_cuda():
    from attnzoo.backends.dispatch import AUTO_ORDER, auto_order, explain_request

    assert auto_order(_req(1))[0] == "triton" and auto_order(_req(32, hq=1))[0] == "triton"
    assert auto_order(_req(1, d=128, dv=128)) == AUTO_ORDER  # GQA decode: SDPA first, as before
    assert auto_order(_req(1, grad=True)) == AUTO_ORDER
    assert auto_order(_req(1, device="cpu")) == AUTO_ORDER
    assert explain_request(_req(1)).backend == "triton"
