"""The fused Triton layout of a routed pattern (`backends/triton/routed_layout.py`, Triton's CPU interpreter)
against `RoutedBlocks.layouts` (the PyTorch closed form): the same partial and full lists, forward and
transposed, for kernel blocks inside, equal to and straddling the router's, causal and not, cross
attention (queries after an offset, and more queries than keys), ragged lengths, per-head and shared
masks, random masks of several densities."""
import pytest
import torch

import attnzoo as az

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.backends.triton.routed_layout import _span, routed_layouts  # noqa: E402

if not ops.interpreting() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lists(lay):
    """(count, sorted valid entries) per line of both lists: what a kernel reads."""
    out = []
    for num, idx in ((lay.kv_num_blocks, lay.kv_indices), (lay.full_kv_num_blocks, lay.full_kv_indices)):
        num, idx = num.cpu(), idx.cpu()
        rows = [[sorted(idx[0, h, i, :int(num[0, h, i])].tolist()) for i in range(num.shape[2])]
                for h in range(num.shape[1])]
        out.append((num.tolist(), rows))
    return out


# (H or None for a shared mask, Lq, Lk, router block (bq, bk), kernel block (BM, BN))
CASES = [
    (3, 64, 64, (16, 16), (16, 16)),     # equal blocks
    (2, 64, 64, (32, 32), (16, 16)),     # kernel blocks inside router blocks
    (2, 96, 96, (16, 16), (32, 64)),     # kernel blocks larger (2 x 4 router blocks)
    (2, 40, 64, (16, 16), (16, 16)),     # cross attention: offset 24 straddles router rows
    (1, 50, 50, (12, 12), (16, 8)),      # sizes that do not divide, ragged ends
    (None, 77, 77, (16, 8), (32, 16)),   # shared mask, rectangular router blocks
    (2, 80, 48, (16, 16), (16, 16)),     # more queries than keys: rows before position 0 see nothing
    (2, 33, 70, (8, 16), (16, 32)),      # odd lengths everywhere
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}-L{c[1]}x{c[2]}-r{c[3][0]}x{c[3][1]}-k{c[4][0]}x{c[4][1]}")
def test_same_lists_as_pytorch_closed_form(case, causal):
    h, lq, lk, (bq, bk), (bm, bn) = case
    nqr, nkr = -(-lk // bq), -(-lk // bk)
    gen = torch.Generator().manual_seed(lq * 7 + lk + bq + bm + causal)
    for density in (0.15, 0.5, 0.9):
        shape = (nqr, nkr) if h is None else (h, nqr, nkr)
        mask = (torch.rand(shape, generator=gen) < density).to(DEV)
        p = az.RoutedBlocks(mask, (bq, bk), causal=causal)
        heads = 2 if h is None else h
        ref, tref = p.layouts(lq, lk, bm, bn, device=DEV, num_heads=heads, transposed=True)
        got, tgot = routed_layouts(p, lq, lk, bm, bn, DEV, num_heads=heads, transposed=True)
        assert (got.block_q, got.block_k, got.q_len, got.kv_len) == (bm, bn, lq, lk)
        assert (tgot.block_q, tgot.block_k, tgot.q_len, tgot.kv_len) == (bn, bm, lk, lq)
        assert got.kv_indices.shape == ref.kv_indices.shape and tgot.kv_indices.shape == tref.kv_indices.shape
        assert _lists(got) == _lists(ref), f"forward layout differs at density {density}"
        assert _lists(tgot) == _lists(tref), f"transposed layout differs at density {density}"


def test_span_counts_router_blocks_met():
    assert _span(128, 64, 0, 100) == 2 and _span(64, 64, 0, 100) == 1 and _span(16, 64, 0, 100) == 1
    assert _span(64, 64, 24, 100) == 2          # an offset straddles
    assert _span(16, 12, 0, 100) == 2           # phases 0, 4, 8: 8..23 still meets only two blocks of 12
    assert _span(16, 8, 4, 100) == 3            # 4..19 meets three blocks of 8
    assert _span(16, 12, 0, 1) == 2             # one line: only phase 0


def test_backend_uses_it_and_results_match():
    """The Triton backend's routed forward and backward take their layouts from the fused kernel."""
    from attnzoo.routing import TopKBlocks
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).to(DEV) for _ in range(3))
    router = TopKBlocks(16, top_k=1)
    call = router.plan(q, k, v)
    lay, tlay = ops._routed_layouts(call.pattern, 64, 64, 16, 16, 2, DEV, transposed=True)
    ref, tref = call.pattern.layouts(64, 64, 16, 16, device=DEV, num_heads=2, transposed=True)
    assert _lists(lay) == _lists(ref) and _lists(tlay) == _lists(tref)
    out = az.attention(q, k, v, pattern=router, backend="triton")
    dense = az.attention(q, k, v, pattern=router, backend="reference")
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
