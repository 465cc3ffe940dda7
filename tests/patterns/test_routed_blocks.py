"""`RoutedBlocks` (a per-call device block mask): the mask against a loop expansion of the block grid, the
block layout exact for kernel blocks equal to, smaller than, larger than and not dividing the router's
blocks (causal or not, cross attention both ways, ragged ends, shared or per-head masks), the transposed
layout, density, identity semantics and errors."""
from __future__ import annotations

import pytest
import torch

from attnzoo.patterns import BlockSparse, Causal, RoutedBlocks
from attnzoo.patterns.base import Ctx
from test_layout import block_counts


def expand(mask: torch.Tensor, block_size, causal: bool, q_len: int, kv_len: int) -> torch.Tensor:
    """(H, Lq, Lk) by loops: query i sits at position p = i + Lk - Lq and sees key j iff p >= 0, the block
    pair (p // bq, j // bk) is on, and (causal) j <= p."""
    bm = mask if mask.dim() == 3 else mask[None]
    bq, bk = block_size
    out = torch.zeros(bm.shape[0], q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + kv_len - q_len
        if p < 0:
            continue
        for j in range(kv_len):
            if causal and j > p:
                continue
            out[:, i, j] = bm[:, p // bq, j // bk]
    return out


def random_mask(h, nq, nk, density, seed):
    """(h, nq, nk) bool; h = 0: one shared (nq, nk) mask."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(max(h, 1), nq, nk, generator=g) < density
    return m[0] if h == 0 else m


def check_exact(p: RoutedBlocks, q_len, kv_len, bm, bn):
    """Full blocks are exactly those entirely visible, partial ones exactly those partly visible."""
    masks = expand(p.block_mask, p.block_size, p.causal, q_len, kv_len)
    heads = masks.shape[0] if p.head_dependent else None
    lay = p.block_layout(q_len, kv_len, bm, bn, num_heads=heads)
    h = masks.shape[0]
    full, part = lay.full_blocks(), lay.partial_blocks()
    assert full.shape[0] in (1, h)
    full, part = full.expand(h, *full.shape[1:]), part.expand(h, *part.shape[1:])
    count, area = block_counts(masks, bm, bn)
    where = f"{p!r} Lq={q_len} Lk={kv_len} kernel block ({bm}, {bn})"
    assert torch.equal(full, count == area), f"{where}: full blocks differ"
    assert torch.equal(part, (count > 0) & (count < area)), f"{where}: partial blocks differ"
    return lay, masks


# (router block, kernel block, relation)
BLOCKS = [
    ((8, 8), (8, 8), "equal"),
    ((8, 8), (4, 2), "smaller"),
    ((16, 8), (8, 8), "smaller-rect"),
    ((4, 4), (8, 8), "larger"),
    ((4, 4), (16, 12), "larger-rect"),
    ((6, 6), (4, 4), "not-dividing"),
    ((5, 7), (3, 4), "not-dividing-rect"),
    ((8, 8), (5, 11), "not-dividing-larger"),
]
LENGTHS = [(40, 40), (29, 47), (47, 29), (1, 33), (33, 33)]


@pytest.mark.parametrize("router_block, kernel_block, rel", BLOCKS, ids=[b[2] for b in BLOCKS])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_layout_exact(router_block, kernel_block, rel, causal):
    bq, bk = router_block
    for n, (lq, lk) in enumerate(LENGTHS):
        nq, nk = -(-lk // bq), -(-lk // bk)
        for heads, dens in ((3, 0.4), (0, 0.7), (2, 0.97)):
            seed = 100 * n + heads
            mask = random_mask(heads, nq + (n % 2), nk, dens, seed)   # larger masks are fine
            p = RoutedBlocks(mask, router_block, causal=causal)
            check_exact(p, lq, lk, *kernel_block)


@pytest.mark.parametrize("lq, lk", [(40, 40), (31, 40), (40, 24)])
def test_mask_and_density_match_loops(lq, lk):
    bs = (8, 4)
    mask = random_mask(2, -(-lk // 8), -(-lk // 4), 0.5, lq)
    qi, ki = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    for causal in (False, True):
        p = RoutedBlocks(mask, bs, causal=causal)
        want = expand(mask, bs, causal, lq, lk)
        got = torch.stack([p.mask(qi, ki, lq, lk, head=h) for h in range(2)])
        assert torch.equal(got, want)
        assert abs(p.density(lq, lk, 2) - want.double().mean().item()) < 1e-12
        assert p.count_visible(lq, lk, 2) == int(want.sum())
        mm = p.mask_mod(lq, lk)
        assert torch.equal(mm(0, 1, qi, ki), want[1])


def test_same_layout_as_blocksparse_and_causal():
    """The static twin `BlockSparse(mask, bs) & Causal()` gives the same blocks."""
    mask = random_mask(3, 6, 6, 0.4, 7)
    for lq, lk, bm, bn in ((44, 44, 16, 16), (30, 44, 8, 16), (44, 44, 3, 5)):
        a = RoutedBlocks(mask, 8, causal=True).block_layout(lq, lk, bm, bn, num_heads=3)
        b = (BlockSparse(mask, 8) & Causal()).block_layout(lq, lk, bm, bn, num_heads=3)
        assert torch.equal(a.full_blocks(), b.full_blocks())
        assert torch.equal(a.partial_blocks(), b.partial_blocks())


@pytest.mark.parametrize("bm, bn", [(8, 8), (16, 4), (5, 7)])
def test_transposed_layouts(bm, bn):
    mask = random_mask(2, 5, 5, 0.5, bm)
    p = RoutedBlocks(mask, 8, causal=True)
    lay, tlay = p.layouts(30, 37, bm, bn, num_heads=2)
    ref = p.block_layout(30, 37, bm, bn, num_heads=2)
    for got, want in ((lay.full_blocks(), ref.full_blocks()), (lay.partial_blocks(), ref.partial_blocks()),
                      (tlay.full_blocks(), ref.full_blocks().transpose(1, 2)),
                      (tlay.partial_blocks(), ref.partial_blocks().transpose(1, 2))):
        assert torch.equal(got, want)
    assert (tlay.block_q, tlay.block_k, tlay.q_len, tlay.kv_len) == (bn, bm, 37, 30)
    assert p.layouts(30, 37, bm, bn, num_heads=2, transposed=False)[1] is None


def test_classification_is_closed_form():
    """No uncertain blocks: the layout never evaluates the mask nor syncs (no nonzero())."""
    p = RoutedBlocks(random_mask(2, 5, 5, 0.5, 1), 8, causal=True)
    for bm, bn in ((8, 8), (4, 4), (16, 16), (6, 10)):
        assert p._classify(Ctx(33, 40, bm, bn, 2, torch.device("cpu")))[2] is None


def test_nested():
    p = RoutedBlocks(torch.ones(2, 2, dtype=torch.bool), 32, causal=True)
    assert p.nested(64, 64, 16, 16) and p.nested(48, 64, 16, 32)
    assert not p.nested(40, 64, 16, 16)   # the offset 24 is not a multiple of 16
    assert not p.nested(64, 64, 64, 16) and not p.nested(64, 64, 16, 24)


def test_identity_semantics_and_repr():
    m = torch.ones(1, 2, 2, dtype=torch.bool)
    a, b = RoutedBlocks(m, 8), RoutedBlocks(m.clone(), 8)
    assert a == a and a != b       # equal masks, different patterns (per-call objects)
    assert len({a, b, a}) == 2
    assert a.static_key() == b.static_key() == ("RoutedBlocks", (1, 2, 2), (8, 8), False)
    assert repr(RoutedBlocks(m, (8, 4), causal=True)) == \
        "RoutedBlocks(<1x2x2 blocks on cpu>, block_size=(8, 4), causal=True)"
    assert a.head_dependent and not RoutedBlocks(m[0], 8).head_dependent
    with pytest.raises(AttributeError):
        a.causal = True
    # composes like any pattern: & Causal() is causal=True
    c1 = (RoutedBlocks(m, 8) & Causal()).block_layout(16, 16, 4, 4, num_heads=1)
    c2 = RoutedBlocks(m, 8, causal=True).block_layout(16, 16, 4, 4, num_heads=1)
    assert torch.equal(c1.full_blocks(), c2.full_blocks()) and torch.equal(c1.partial_blocks(), c2.partial_blocks())


def test_errors():
    m = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        RoutedBlocks(m.int(), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        RoutedBlocks([[True]], 8)
    with pytest.raises(ValueError, match="shape"):
        RoutedBlocks(m[None], 8)
    with pytest.raises(ValueError, match="empty"):
        RoutedBlocks(m[:, :0], 8)
    with pytest.raises(ValueError, match="block_size"):
        RoutedBlocks(m, 0)
    with pytest.raises(TypeError, match="causal"):
        RoutedBlocks(m, 8, causal=1)
    p = RoutedBlocks(m, 8)
    with pytest.raises(ValueError, match="heads"):
        p.check(32, 32, 3)
    with pytest.raises(ValueError, match="cover"):
        p.check(40, 40, 2)
    p.check(32, 32, 2)
