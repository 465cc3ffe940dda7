"""Block statistics of neighborhood attention in row-major vs. tile-major token order (CPU only).

For the benchmark protocol's neighborhood shapes and kernel block sizes, prints: the tile that
`neighborhood_tiling` picks, the partial and full blocks of the layout, the waste factor (pairs in
visited blocks / visible pairs: the work a block-sparse kernel does over the ideal) and the time to
pick the tile and to build the layout (cold caches).

    .venv/bin/python benchmarks/nbhd_tiling_stats.py
"""
from __future__ import annotations

import math
import time

import attnzoo.patterns.neighborhood as N
from attnzoo.patterns import Neighborhood, neighborhood_tiling

CASES = [
    ("nbhd2d 13x13 @128x128", Neighborhood(13, grid=(128, 128))),
    ("nbhd2d 31x31 @128x128", Neighborhood(31, grid=(128, 128))),
    ("nbhd3d 5x7x7 @16x32x32", Neighborhood((5, 7, 7), grid=(16, 32, 32))),
]
BLOCKS = (64, 128)


def stats(pattern, n, block):
    t0 = time.perf_counter()
    lay = pattern.block_layout(n, n, block, block)
    ms = (time.perf_counter() - t0) * 1e3
    partial, full = int(lay.kv_num_blocks.sum()), int(lay.full_kv_num_blocks.sum())
    return partial, full, ms


def main():
    header = f"{'pattern':<24} {'block':>5} {'order':<11} {'tile':<11} {'partial':>8} {'full':>7} " \
             f"{'waste':>7} {'tiling ms':>10} {'layout ms':>10}"
    print(header)
    print("-" * len(header))
    for name, nb in CASES:
        n = math.prod(nb.grid)
        visible = nb.count_visible(n, n)
        for block in BLOCKS:
            p, f, ms = stats(nb, n, block)
            print(f"{name:<24} {block:>5} {'row-major':<11} {'-':<11} {p:>8} {f:>7} "
                  f"{(p + f) * block * block / visible:>6.2f}x {'':>10} {ms:>10.1f}")
            N._best_tile.cache_clear()
            N._permutation.cache_clear()
            N._tiling.cache_clear()
            t0 = time.perf_counter()
            tiling = neighborhood_tiling(nb, block)
            tiling_ms = (time.perf_counter() - t0) * 1e3
            if tiling is None:
                print(f"{name:<24} {block:>5} {'tiled':<11} {'(none)':<11}")
                continue
            tiled = tiling[2]
            p, f, ms = stats(tiled, n, block)
            tile = "x".join(map(str, tiled.tile))
            print(f"{name:<24} {block:>5} {'tiled':<11} {tile:<11} {p:>8} {f:>7} "
                  f"{(p + f) * block * block / visible:>6.2f}x {tiling_ms:>10.1f} {ms:>10.1f}")


if __name__ == "__main__":
    main()
