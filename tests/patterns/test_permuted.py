"""`TiledNeighborhood` (a Neighborhood over tile-major token order) and `neighborhood_tiling`: the order
against a loop-based definition, the mask against the naive Neighborhood under the permutation, exact
block layouts and densities, and the drop in partial blocks that motivates the order."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.patterns import Causal, Neighborhood, TiledNeighborhood, neighborhood_tiling
from naive import naive_neighborhood_mask_kron
from test_layout import block_counts


def naive_perm(grid, dilation, tile) -> list[int]:
    """The tile-major order from its definition: dilation groups (row-major), then tiles of the group's
    grid (row-major), then row-major inside the tile; entry i is the row-major index of the token."""
    lg = [L // d for L, d in zip(grid, dilation)]
    nt = [g // t for g, t in zip(lg, tile)]
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    out = []
    for gs in itertools.product(*[range(d) for d in dilation]):
        for ts in itertools.product(*[range(n) for n in nt]):
            for rs in itertools.product(*[range(t) for t in tile]):
                coords = [(t * T + r) * d + g for g, t, r, T, d in zip(gs, ts, rs, tile, dilation)]
                out.append(sum(c * s for c, s in zip(coords, strides)))
    return out


def reference(nb: Neighborhood, tile):
    """(perm, permuted naive mask) for TiledNeighborhood(nb, tile), without the pattern's own code."""
    perm = torch.tensor(naive_perm(nb.grid, nb.dilation, tile))
    m = naive_neighborhood_mask_kron(nb, math.prod(nb.grid))
    return perm, m[perm][:, perm]


def check_layout_exact(pat, m, block_q, block_k):
    n = m.shape[0]
    lay = pat.block_layout(n, n, block_q, block_k)
    count, area = block_counts(m[None], block_q, block_k)
    ctx = f"{pat!r} block=({block_q},{block_k})"
    assert torch.equal(lay.full_blocks()[0], (count == area)[0]), ctx
    assert torch.equal(lay.partial_blocks()[0], ((count > 0) & (count < area))[0]), ctx
    return lay


CASES = [  # (neighborhood, tile)
    (Neighborhood((3, 5), grid=(8, 12)), (4, 4)),
    (Neighborhood((3, 5), grid=(8, 12)), (2, 3)),
    (Neighborhood(3, grid=(6, 10)), (3, 5)),
    (Neighborhood((3, 3), dilation=(1, 2), grid=(8, 16)), (4, 4)),
    (Neighborhood((3, 3), dilation=(2, 2), causal=(True, False), grid=(8, 12)), (2, 3)),
    (Neighborhood((5, 3), stride=(2, 3), grid=(10, 9)), (5, 3)),
    (Neighborhood((4, 3), stride=(3, 1), causal=(False, True), grid=(12, 8)), (4, 2)),
    (Neighborhood((2, 3, 3), stride=(1, 2, 3), grid=(2, 4, 6)), (2, 2, 2)),
    (Neighborhood((3, 3, 5), dilation=(1, 2, 1), causal=(True, False, False), grid=(4, 8, 10)), (2, 2, 5)),
    (Neighborhood((2, 2, 3), stride=(1, 2, 3), dilation=(2, 1, 1), grid=(4, 6, 6)), (1, 3, 3)),
    (Neighborhood((3, 3), grid=(9, 7)), (1, 1)),
    (Neighborhood((3, 3), grid=(9, 7)), (9, 7)),
]
IDS = [f"{nb!r}-tile{t}" for nb, t in CASES]


@pytest.mark.parametrize("nb, tile", CASES, ids=IDS)
def test_permutation_is_tile_major(nb, tile):
    pat = TiledNeighborhood(nb, tile)
    perm, inv = pat.permutation()
    n = math.prod(nb.grid)
    assert perm.dtype == inv.dtype == torch.int64 and perm.shape == inv.shape == (n,)
    assert perm.tolist() == naive_perm(nb.grid, nb.dilation, tile)
    assert sorted(perm.tolist()) == list(range(n))
    assert torch.equal(inv[perm], torch.arange(n)) and torch.equal(perm[inv], torch.arange(n))
    # every run of prod(tile) consecutive positions is one box of the grid (in group coordinates)
    vol = math.prod(tile)
    coords = torch.stack(torch.unravel_index(perm, nb.grid), -1).view(n // vol, vol, -1)
    extent = coords.max(1).values - coords.min(1).values
    assert torch.equal(extent, ((torch.tensor(tile) - 1) * torch.tensor(nb.dilation)).expand_as(extent))


@pytest.mark.parametrize("nb, tile", CASES, ids=IDS)
def test_mask_is_base_mask_under_perm(nb, tile):
    pat = TiledNeighborhood(nb, tile)
    n = math.prod(nb.grid)
    perm, want = reference(nb, tile)
    i = torch.arange(n)
    got = pat.mask(i[:, None], i[None, :], n, n)
    assert torch.equal(got, nb.mask(perm[:, None], perm[None, :], n, n))
    assert torch.equal(got, want)
    f = pat.mask_mod(n, n)
    assert torch.equal(f(0, 0, i[:, None], i[None, :]), want)


@pytest.mark.parametrize("nb, tile", CASES, ids=IDS)
def test_layout_and_density_exact(nb, tile):
    pat = TiledNeighborhood(nb, tile)
    n = math.prod(nb.grid)
    _, m = reference(nb, tile)
    vol = math.prod(tile)
    # vol x vol: the per-axis product path; the others: the window enumeration
    for bq, bk in {(vol, vol), (2 * vol, 2 * vol), (vol, 2 * vol), (5, 5), (16, 16), (7, 12), (n, n), (1, 1)}:
        check_layout_exact(pat, m, bq, bk)
    assert pat.density(n, n) == nb.density(n, n)
    assert abs(pat.density(n, n) - int(m.sum()) / m.numel()) <= 1e-12
    assert pat.count_visible(n, n) == int(m.sum())


@st.composite
def tiled_neighborhoods(draw, max_tokens=400):
    ndim = draw(st.integers(2, 3))
    grid, ks, ds, ss, cs, tile = [], [], [], [], [], []
    for _ in range(ndim):
        d = draw(st.integers(1, 3))
        t = draw(st.integers(1, 4))
        L = d * t * draw(st.integers(1, 4))
        k = draw(st.integers(1, L // d))
        grid.append(L), ds.append(d), tile.append(t), ks.append(k)
        ss.append(draw(st.integers(1, k))), cs.append(draw(st.booleans()))
    if math.prod(grid) > max_tokens:
        grid[0], ks[0], ds[0], ss[0], tile[0] = 1, 1, 1, 1, 1
    nb = Neighborhood(tuple(ks), dilation=tuple(ds), stride=tuple(ss), causal=tuple(cs), grid=tuple(grid))
    return nb, tuple(tile)


@settings(max_examples=60, deadline=None)
@given(tiled_neighborhoods(), st.integers(1, 20), st.integers(1, 20))
def test_random_tilings(nb_tile, block_q, block_k):
    nb, tile = nb_tile
    pat = TiledNeighborhood(nb, tile)
    n = math.prod(nb.grid)
    perm, m = reference(nb, tile)
    assert torch.equal(pat.permutation()[0], perm)
    i, j = torch.randint(0, n, (2000,)), torch.randint(0, n, (2000,))
    assert torch.equal(pat.mask(i, j, n, n), m[i, j])
    vol = math.prod(tile)
    check_layout_exact(pat, m, vol, vol)
    check_layout_exact(pat, m, block_q, block_k)
    assert pat.density(n, n) == nb.density(n, n)


def test_larger_grids_against_kron():
    for nb, block in [(Neighborhood(7, grid=(48, 40)), 64), (Neighborhood((5, 7), dilation=(2, 1), grid=(32, 40)), 32),
                      (Neighborhood((3, 5, 5), stride=(1, 2, 2), grid=(8, 16, 16)), 64)]:
        perm, inv, pat = neighborhood_tiling(nb, block)
        assert math.prod(pat.tile) == block
        m = naive_neighborhood_mask_kron(nb, math.prod(nb.grid))[perm][:, perm]
        for bq, bk in [(block, block), (50, 50), (block, 2 * block)]:
            check_layout_exact(pat, m, bq, bk)


@pytest.mark.parametrize("nb, tile", [(Neighborhood(13, grid=(128, 128)), (8, 8)),
                                      (Neighborhood(31, grid=(128, 128)), (8, 8))], ids=repr)
def test_partial_blocks_drop(nb, tile):
    """128x128 grid, 64-token blocks: row-major blocks are 1x64 strips, all partial; 8x8 tiles leave
    under a third of the partial blocks (and make some full)."""
    n, block = math.prod(nb.grid), 64
    perm, inv, pat = neighborhood_tiling(nb, block)
    assert pat.tile == tile
    row = nb.block_layout(n, n, block, block)
    til = pat.block_layout(n, n, block, block)
    visible = nb.count_visible(n, n)
    stats = {}
    for name, lay in (("row-major", row), ("tiled", til)):
        p, f = int(lay.kv_num_blocks.sum()), int(lay.full_kv_num_blocks.sum())
        stats[name] = (p, f)
        print(f"{nb!r} {name:>9}: partial {p:5d}, full {f:5d}, waste {(p + f) * block * block / visible:.2f}x")
    assert stats["tiled"][0] < stats["row-major"][0] / 3
    assert sum(stats["tiled"]) < sum(stats["row-major"]) / 2


def test_row_major_kept_where_best():
    """32x32 grid, 7x7 kernel, 64-token blocks: a block is two whole rows, and every 64-token tile visits
    at least as many blocks (8x8 tiles: 100 vs 76), so the tiling declines."""
    nb, n = Neighborhood(7, grid=(32, 32)), 1024
    assert neighborhood_tiling(nb, 64) is None
    row = int(nb.block_layout(n, n, 64, 64).kv_num_blocks.sum())
    tiled = int(TiledNeighborhood(nb, (8, 8)).block_layout(n, n, 64, 64).kv_num_blocks.sum())
    print(f"32x32, 7x7, block 64: partial blocks row-major {row}, 8x8 tiles {tiled}")
    assert (row, tiled) == (76, 100)


# -- neighborhood_tiling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nb, block, tile", [
    (Neighborhood(13, grid=(128, 128)), 64, (8, 8)),
    (Neighborhood(13, grid=(128, 128)), 128, (8, 16)),
    (Neighborhood(31, grid=(128, 128)), 64, (8, 8)),
    (Neighborhood((5, 7, 7), grid=(16, 32, 32)), 64, (4, 4, 4)),
    (Neighborhood((3, 3), grid=(8, 12)), 16, (8, 2)),
])
def test_tiling_choices(nb, block, tile):
    perm, inv, pat = neighborhood_tiling(nb, block)
    assert pat == TiledNeighborhood(nb, tile)
    assert pat.neighborhood == nb
    assert torch.equal(perm, pat.permutation()[0]) and torch.equal(inv, pat.permutation()[1])


@pytest.mark.parametrize("nb, block", [
    (Neighborhood((3, 5), grid=(16, 24)), 16), (Neighborhood((5, 5), stride=(2, 1), grid=(16, 16)), 32),
    (Neighborhood((3, 3), dilation=(2, 1), causal=(True, False), grid=(16, 24)), 16),
    (Neighborhood((3, 3, 3), grid=(8, 8, 12)), 32), (Neighborhood((2, 3, 5), stride=(1, 3, 1), grid=(4, 12, 16)), 16),
])
def test_tiling_minimises_the_block_cost(nb, block):
    """The per-axis scoring finds the tile with the fewest blocks (a partial one weighted 1.5), checked
    against the layouts of every candidate tile."""
    from attnzoo.patterns.neighborhood import _PARTIAL_COST, _tile_candidates

    n = math.prod(nb.grid)
    lg = [L // d for L, d in zip(nb.grid, nb.dilation)]
    costs = {}
    for tile in _tile_candidates(lg, block):
        lay = TiledNeighborhood(nb, tile).block_layout(n, n, block, block)
        p, f = int(lay.kv_num_blocks.sum()), int(lay.full_kv_num_blocks.sum())
        costs[tile] = f + _PARTIAL_COST * p
    assert len(costs) > 2
    best = min(costs.values())
    out = neighborhood_tiling(nb, block)
    chosen = out[2].tile if out is not None else next(t for t in costs if TiledNeighborhood(nb, t)._identity())
    assert costs[chosen] == best, (chosen, costs)


def test_tiling_result_properties():
    nb = Neighborhood((3, 5), dilation=(2, 1), causal=(True, False), grid=(16, 24))
    for block in (8, 16, 32, 64, 12, 48, 96, 192):  # a dilation group is 8x24
        out = neighborhood_tiling(nb, block)
        assert out is not None, block
        perm, inv, pat = out
        assert math.prod(pat.tile) == block
        assert torch.equal(inv[perm], torch.arange(16 * 24))
        assert neighborhood_tiling(nb, block)[2] is pat          # cached
        assert neighborhood_tiling(nb, block)[0] is perm
    assert neighborhood_tiling(nb, 7) is None                      # no tile of 7 tokens divides 8x24
    assert neighborhood_tiling(nb, 128) is None                    # nor one of 128
    assert neighborhood_tiling(nb, 1024) is None                   # more tokens than the grid has


def test_tiling_declines():
    assert neighborhood_tiling(Neighborhood(5), 64) is None                       # 1-D, no grid
    assert neighborhood_tiling(Neighborhood(5, grid=(256,)), 64) is None         # 1-D
    assert neighborhood_tiling(Neighborhood((3, 3), dilation=(2, 1), grid=(9, 16)), 16) is None  # 2 does not divide 9
    with pytest.raises(TypeError, match="needs a Neighborhood"):
        neighborhood_tiling(Causal(), 64)
    with pytest.raises(ValueError, match="block must be >= 1"):
        neighborhood_tiling(Neighborhood((3, 3), grid=(8, 8)), 0)


def test_tiling_on_device_argument():
    nb = Neighborhood(13, grid=(128, 128))
    perm, inv, _ = neighborhood_tiling(nb, 64, device="cpu")
    assert perm.device.type == "cpu"


# -- validation, repr, values ----------------------------------------------------------------------------
def test_validation_errors():
    nb = Neighborhood((3, 3), dilation=(1, 2), grid=(8, 12))
    with pytest.raises(TypeError, match="needs a Neighborhood"):
        TiledNeighborhood(Causal(), (2, 2))
    with pytest.raises(ValueError, match="grid="):
        TiledNeighborhood(Neighborhood(3), (2,))
    with pytest.raises(ValueError, match="tile has 3 entries but the grid has 2 axes"):
        TiledNeighborhood(nb, (2, 2, 2))
    with pytest.raises(ValueError, match=r"tile\[0\] = 3 does not divide grid\[0\] = 8"):
        TiledNeighborhood(nb, (3, 2))
    with pytest.raises(ValueError, match=r"tile\[1\] = 4 does not divide the dilation group length"):
        TiledNeighborhood(nb, (2, 4))
    with pytest.raises(ValueError, match=r"dilation\[0\] = 2 does not divide grid\[0\] = 9"):
        TiledNeighborhood(Neighborhood((3, 3), dilation=(2, 1), grid=(9, 8)), (1, 2))
    with pytest.raises(ValueError, match=r"TiledNeighborhood tile\[0\] must be >= 1"):
        TiledNeighborhood(nb, (0, 2))
    with pytest.raises(TypeError):
        TiledNeighborhood(nb, (2.0, 2))
    pat = TiledNeighborhood(nb, 2)
    assert pat.tile == (2, 2)
    with pytest.raises(ValueError, match="self-attention"):
        pat.block_layout(96, 95)
    with pytest.raises(ValueError, match="has 96 tokens but the sequence has 90"):
        pat.block_layout(90, 90)
    with pytest.raises(ValueError, match="self-attention"):
        pat.density(96, 48)


def test_repr_hash_and_values():
    nb = Neighborhood((3, 5), dilation=(1, 2), causal=(True, False), grid=(8, 12))
    pat = TiledNeighborhood(nb, (4, 2))
    text = "TiledNeighborhood(Neighborhood(kernel_size=(3, 5), dilation=(1, 2), causal=(True, False), " \
           "grid=(8, 12)), tile=(4, 2))"
    assert repr(pat) == text
    ns = {name: getattr(attnzoo, name) for name in attnzoo.__all__}
    again = eval(text, ns)
    assert again == pat and hash(again) == hash(pat)
    copy = dataclasses.replace(pat)
    assert copy == pat and copy is not pat and copy in {pat}
    assert pat != TiledNeighborhood(nb, (2, 2)) and pat != nb
    assert attnzoo.TiledNeighborhood is TiledNeighborhood and attnzoo.neighborhood_tiling is neighborhood_tiling


def test_composes_with_the_algebra():
    nb = Neighborhood((3, 3), grid=(8, 8))
    pat = TiledNeighborhood(nb, (4, 4))
    perm, m = reference(nb, (4, 4))
    n = 64
    comp = pat & Causal()
    i = torch.arange(n)
    assert torch.equal(comp.mask(i[:, None], i[None, :], n, n), m & (i[:, None] >= i[None, :]))
    check_layout_exact(comp, m & (i[:, None] >= i[None, :]), 16, 16)
