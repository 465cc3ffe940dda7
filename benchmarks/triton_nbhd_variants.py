"""Forward config variants of the Triton kernel on the N-D neighborhoods of the long-context grid, against
compiled FlexAttention (issue 3: the neighborhoods run at 0.06-0.27 of the ideal speedup).

What bounds them: with the tiled token order (`neighborhood_tiling`) a 64-token query tile of a 13x13
neighborhood visits 3.1x the key pairs it needs (every block partial, so every block evaluates the mask),
32-token tiles 2.6x; a 5x7x7 kernel visits 4.9x with 64x64 blocks and 3.0x with 32x32 (exact counts from
the layouts, printed per variant as ``visit``). Smaller blocks cut the waste but run smaller dots; this
measures the trade. Each variant: the tiling for its query block, q / k / v gathered into that order
(outside the timing, as a model would keep them), the forward through `ops.attention_fwd` on the tiled
pattern, its output (back in the original order) checked against float64 on two query heads of one group
(protocol rule), then timed. Prints a table last; ``--out`` writes JSON lines.

    PYTHONPATH=src python3 benchmarks/triton_nbhd_variants.py --out DIR [--quick]
    PYTHONPATH=src python3 benchmarks/triton_nbhd_variants.py --orders --out DIR   # through attention()

``--orders``: the whole call, ``attention(q, k, v, Neighborhood, backend="triton")`` in row-major order, forward
and forward+backward, for each way the backend runs the tile order (``NBHD_ORDERS``: the kernels' row maps
in place, the query side mapped with K / V gathered, or every tensor gathered and the output put back), next
to compiled FlexAttention on the same call.
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/triton_nbhd_variants.py --smoke   # CPU smoke run
"""
import argparse
import os
import sys

import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.backends.triton import ops
from attnzoo.backends.triton.codegen import InPlaceTiled
from attnzoo.patterns import neighborhood_tiling
from attnzoo.testing import check_close, rel_rmse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import dense_math, median_timer, row_sink  # noqa: E402

PATTERNS = {  # name -> (kernel, grid): the protocol's neighborhoods at 16K tokens
    "nbhd2d-13x13": ((13, 13), (128, 128)),
    "nbhd2d-31x31": ((31, 31), (128, 128)),
    "nbhd3d-5x7x7": ((5, 7, 7), (16, 32, 32)),
}
SMOKE = {"nbhd2d-3x5": ((3, 5), (8, 8)), "nbhd3d-3x3x3": ((3, 3, 3), (4, 4, 4))}


def _cfg(bm, bn, w, s, pack=1, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, PACK=pack, **kw)


VARIANTS = {
    "64x64 p4 w8 s3 (default)": _cfg(64, 64, 8, 3, 4),
    "64x64 w4 s3": _cfg(64, 64, 4, 3),
    "64x32 p4 w8 s3": _cfg(64, 32, 8, 3, 4),
    "64x32 p4 w4 s3": _cfg(64, 32, 4, 3, 4),
    "32x32 p4 w4 s3": _cfg(32, 32, 4, 3, 4),
    "32x32 p8 w8 s3": _cfg(32, 32, 8, 3, 8),
    "32x32 w4 s3": _cfg(32, 32, 4, 3),
    "64x16 p4 w8 s3": _cfg(64, 16, 8, 3, 4),
    "128x64 p2 w8 s3": _cfg(128, 64, 8, 3, 2),
}
# --fwd-next (the forward after round 4 made 32x32 p4 w4 s3 the default; the in-place order with --in-place): the
# block index loaded a step ahead (IDX 1), full and partial blocks in one loop (MERGE), LAZY rescaling, 2 stages
FWD_NEXT = {
    "32x32 p4 w4 s3 (IDX 0)": _cfg(32, 32, 4, 3, 4),  # the default before IDX 1 + MERGE (H100, 2026-12-05)
    "32x32 p4 w4 s3 IDX1": _cfg(32, 32, 4, 3, 4, IDX=1),
    "32x32 p4 w4 s3 IDX1 MERGE": _cfg(32, 32, 4, 3, 4, IDX=1, MERGE=True),
    "32x32 p4 w4 s3 LAZY": _cfg(32, 32, 4, 3, 4, LAZY=True),
    "32x32 p4 w4 s3 IDX1 LAZY": _cfg(32, 32, 4, 3, 4, IDX=1, LAZY=True),
    "32x32 p4 w4 s2 IDX1": _cfg(32, 32, 4, 2, 4, IDX=1),
    "32x32 p2 w4 s3 IDX1": _cfg(32, 32, 4, 3, 2, IDX=1),
    # PIPE (the next block's scores in flight during the softmax): sm_90 registers / stack in place, 13 x 13:
    # p4 w4 255 / 88 B, p4 w8 152 / 0, p2 w4 156 / 0 (the default: 252 / 0)
    "32x32 p4 w8 s3 PIPE": _cfg(32, 32, 8, 3, 4, IDX=1, MERGE=True, PIPE=True),
    "32x32 p4 w4 s3 PIPE": _cfg(32, 32, 4, 3, 4, IDX=1, MERGE=True, PIPE=True),
    "32x32 p2 w4 s3 PIPE": _cfg(32, 32, 4, 3, 2, IDX=1, MERGE=True, PIPE=True),
}
# --bwd (after the forward round made 32x32 p4 w4 s3 the neighborhoods' default): backward tiles, each run
# after that forward on its tiling, gradients checked against float64 on two query heads of one group
BWD_FWD = _cfg(32, 32, 4, 3, 4)
BWD_VARIANTS = {
    "bwd 64x64 w4 s2 TMA (default)": _cfg(64, 64, 4, 2, TMA=True),
    # the in-place order maps q / k rows, so no descriptors there: the default without TMA is its baseline
    "bwd 64x64 w4 s2": _cfg(64, 64, 4, 2),
    # every tile of a small neighborhood is partial: dq by atomics evaluates each tile's mask once, not twice
    "bwd 64x64 w4 s2 atomic-dq": _cfg(64, 64, 4, 2, ATOMIC_DQ=True),
    "bwd 64x64 w4 s2 KT": _cfg(64, 64, 4, 2, KT=True),
    "bwd 64x64 w4 s2 KT atomic-dq": _cfg(64, 64, 4, 2, KT=True, ATOMIC_DQ=True),
    "bwd 32x32 w2 s2 atomic-dq": _cfg(32, 32, 2, 2, ATOMIC_DQ=True),
    "bwd 32x32 w4 s2": _cfg(32, 32, 4, 2),
    "bwd 32x32 w4 s3": _cfg(32, 32, 4, 3),
    "bwd 32x64 w4 s2": _cfg(32, 64, 4, 2),
    "bwd 64x32 w4 s2": _cfg(64, 32, 4, 2),
    "bwd 32x32 w2 s2": _cfg(32, 32, 2, 2),
}
# --bwd --in-place: the same variants on the in-place order (InPlaceTiled: tensors in row-major order, rows mapped)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--patterns", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1, float32, tiny grids)")
    ap.add_argument("--bwd", action="store_true", help="the backward tiles (BWD_VARIANTS) instead of the forward ones")
    ap.add_argument("--in-place", action="store_true",
                    help="the kernels on InPlaceTiled over row-major tensors (no gathers), not TiledNeighborhood over "
                         "tensors gathered into tile order")
    ap.add_argument("--fwd-next", action="store_true", help="the forward variants FWD_NEXT instead of VARIANTS")
    ap.add_argument("--orders", action="store_true",
                    help="through attention(): each of the backend's NBHD_ORDERS, forward and forward+backward")
    args = ap.parse_args()
    table = SMOKE if args.smoke else PATTERNS
    names = args.patterns.split(",") if args.patterns else list(table)
    dev = "cpu" if args.smoke else "cuda"
    hq, hkv, d = (8, 2, 32) if args.smoke else (64, 8, 128)
    dt = torch.float32 if args.smoke else torch.bfloat16
    variants = {k: dict(v) for k, v in (BWD_VARIANTS if args.bwd else FWD_NEXT if args.fwd_next else VARIANTS).items()}
    fwd_cfg = BWD_FWD
    if args.smoke:  # tiny tiles for the interpreter; keep the packing
        variants = ({"16x16": _cfg(16, 16, 1, 1), "16x16 atomic-dq": _cfg(16, 16, 1, 1, ATOMIC_DQ=True),
                     "16x16 KT": _cfg(16, 16, 1, 1, KT=True)} if args.bwd else
                    {"16x16 p4 IDX1": _cfg(16, 16, 1, 1, 4, IDX=1),
                     "16x16 p4 IDX1 MERGE": _cfg(16, 16, 1, 1, 4, IDX=1, MERGE=True),
                     "16x16 p4 LAZY": _cfg(16, 16, 1, 1, 4, LAZY=True),
                     "16x16 p4 PIPE": _cfg(16, 16, 1, 1, 4, IDX=1, MERGE=True, PIPE=True)} if args.fwd_next else
                    {"16x16 p4": _cfg(16, 16, 1, 1, 4), "16x8 p2": _cfg(16, 8, 1, 1, 2), "8x8": _cfg(8, 8, 1, 1)})
        fwd_cfg = _cfg(16, 16, 1, 1, 4)
    scale = d ** -0.5
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    tag = "_in_place" if args.in_place else ""
    fname = ("nbhd_orders.jsonl" if args.orders else f"nbhd_bwd_variants{tag}.jsonl" if args.bwd else
             f"nbhd_fwd_next{tag}.jsonl" if args.fwd_next else f"nbhd_variants{tag}.jsonl")
    rows, emit, close = row_sink(os.path.join(args.out, fname) if args.out else None)
    timed = median_timer(dev, 0.6 if args.quick else 1.2)

    for pname in names:
        kernel, grid = table[pname]
        p = az.Neighborhood(kernel, grid=grid)
        L = 1
        for g in grid:
            L *= g
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, hq, L, d, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, hkv, L, d, device=dev, dtype=dt, generator=gen)
        v = torch.randn(1, hkv, L, d, device=dev, dtype=dt, generator=gen)
        visible = p.count_visible(L, L)
        fl = 4 * hq * d * visible
        # the check: two query heads of the first group against float64 (and the bf16 math baseline)
        qs, ks, vs = q[:, :2], k[:, :1], v[:, :1]
        ref = reference_attention(qs.double(), ks.double(), vs.double(), p, scale)[0]
        base = dense_math(qs, ks, vs, p, scale)[0] if dt != torch.float32 else None
        fwd_ms, r = timed(lambda: az.attention(q, k, v, p, backend="flex"))
        emit(dict(pattern=pname, L=L, variant="flex", fwd_ms=fwd_ms, fwd_tflops=fl / fwd_ms / 1e9 if fwd_ms else None,
                  message=r.get("message")))
        if args.orders:
            orders(pname, p, q, k, v, scale, fl, fwd_ms, timed, emit, dev, dt)
            continue
        if args.bwd:
            bwd_variants(pname, p, q, k, v, scale, fl, fwd_cfg, variants, timed, emit, dev, dt, args.in_place)
            continue
        for name, cfg in variants.items():
            row = dict(pattern=pname, L=L, variant=name, cfg=cfg)
            try:
                perm, inv, tiled = _tile_order(p, cfg["BLOCK_M"], L, dev, args.in_place)
                lay = tiled.block_layout(L, L, cfg["BLOCK_M"], cfg["BLOCK_N"])
                visited = int(lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum()) * cfg["BLOCK_M"] * cfg["BLOCK_N"]
                row.update(visit=visited / visible, partial_share=float(lay.kv_num_blocks.sum())
                           / max(1.0, float(lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum())))
                qp, kp, vp = (t.index_select(2, perm).contiguous() for t in (q, k, v))
                got = ops.attention_fwd(qp[:, :2], kp[:, :1], vp[:, :1], tiled, scale, poison=True, cfg=cfg)[0]
                got = got.index_select(2, inv)
                row["rel_rmse_vs_fp64"] = rel_rmse(got, ref)
                check_close("out", got, ref, baseline=base)
                ms, r = timed(lambda: ops.attention_fwd(qp, kp, vp, tiled, scale, cfg=cfg))
                row.update(fwd_ms=ms, fwd_tflops=fl / ms / 1e9 if ms else None,
                           flex_over_triton=fwd_ms / ms if ms and fwd_ms else None, message=r.get("message"))
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or match is recorded
                row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
            emit(row)
    close()
    print_table(rows)


def _flex_fwdbwd(pname, p, q, k, v, scale, timed, emit, dev, dt, with_out):
    """dO, q / k / v leaves, flex's fwd+bwd time (emitted), and a ``grads(fn, q, k, v)`` -> (out if ``with_out``,)
    dq, dk, dv under dO's first two heads, with the float64 reference and the 16-bit math baseline of two query
    heads of one group: (do, (qg, kg, vg), fb_ms, grads, ref, base)."""
    L = q.shape[2]
    gen = torch.Generator(device=dev).manual_seed(1)
    do = torch.randn(q.shape, device=dev, dtype=dt, generator=gen)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fb_ms, r = timed(lambda: torch.autograd.backward(az.attention(qg, kg, vg, p, backend="flex"), do))
    emit(dict(pattern=pname, L=L, variant="flex fwd+bwd", fwdbwd_ms=fb_ms, message=r.get("message")))

    def grads(fn, *x):
        x = [t.detach().requires_grad_() for t in x]
        o = fn(*x)
        g = torch.autograd.grad(o, x, do[:, :2].to(x[0].dtype))
        return ((o.detach(),) + g) if with_out else g

    qs, ks, vs = q[:, :2], k[:, :1], v[:, :1]
    ref = grads(lambda a, b, c: reference_attention(a, b, c, p, scale)[0], qs.double(), ks.double(), vs.double())
    base = grads(lambda a, b, c: dense_math(a, b, c, p, scale)[0], qs, ks, vs) if dt != torch.float32 else None
    return do, (qg, kg, vg), fb_ms, grads, ref, base


def _tile_order(p, block, L, dev, in_place):
    """(perm, inv, kernel pattern) for a kernel block of ``block`` query tokens: the `TiledNeighborhood` over
    tensors gathered with ``perm`` (back with ``inv``), or with ``in_place`` the `InPlaceTiled` over the tensors in
    row-major order (identity perm / inv: the kernels map the rows); the pattern itself when nothing tiles."""
    tiling = neighborhood_tiling(p, block, device=dev)
    if tiling is None or in_place:
        ident = torch.arange(L, device=dev)
        return ident, ident, (p if tiling is None else InPlaceTiled(tiling[2]))
    return tiling


def bwd_variants(pname, p, q, k, v, scale, fl, fwd_cfg, variants, timed, emit, dev, dt, in_place=False):
    """Backward tiles on one neighborhood: flex's fwd+bwd, then each variant after the forward ``fwd_cfg``.
    ``in_place``: the kernels on `InPlaceTiled` over the tensors in row-major order (no gathers), else on the
    `TiledNeighborhood` over tensors gathered into tile order (outside the timing)."""
    L = q.shape[2]
    do, _, fb_ms, _, ref, base = _flex_fwdbwd(pname, p, q, k, v, scale, timed, emit, dev, dt, False)
    perm, inv, tiled = _tile_order(p, fwd_cfg["BLOCK_M"], L, dev, in_place)
    qp, kp, vp, dop = (t.index_select(2, perm).contiguous() for t in (q, k, v, do))
    fwd_ms, _ = timed(lambda: ops.attention_fwd(qp, kp, vp, tiled, scale, cfg=fwd_cfg))
    out, lse = ops.attention_fwd(qp, kp, vp, tiled, scale, cfg=fwd_cfg)
    outs, lses = ops.attention_fwd(qp[:, :2], kp[:, :1], vp[:, :1], tiled, scale, cfg=fwd_cfg)
    for name, cfg in variants.items():
        row = dict(pattern=pname, L=L, variant=name, cfg=cfg, fwd_cfg=fwd_cfg, fwd_ms=fwd_ms)
        try:
            got = ops.attention_bwd(dop[:, :2], None, qp[:, :2], kp[:, :1], vp[:, :1], outs, lses, tiled, scale,
                                    cfg=cfg, poison=True)
            got = [g.index_select(2, inv) for g in got]
            row["rel_rmse_vs_fp64"] = max(rel_rmse(a, r_) for a, r_ in zip(got, ref))
            for gname, a, r_, bl in zip(("dq", "dk", "dv"), got, ref, base or (None,) * 3):
                check_close(gname, a, r_, baseline=bl)
            ms, r = timed(lambda: ops.attention_bwd(dop, None, qp, kp, vp, out, lse, tiled, scale, cfg=cfg))
            fb = fwd_ms + ms if ms and fwd_ms else None
            row.update(bwd_ms=ms, fwdbwd_ms=fb, fwd_tflops=3.5 * fl / fb / 1e9 if fb else None,
                       flex_over_triton=fb_ms / fb if fb and fb_ms else None, message=r.get("message"))
        except Exception as e:  # noqa: BLE001
            row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
        emit(row)


def orders(pname, p, q, k, v, scale, fl, flex_fwd_ms, timed, emit, dev, dt):
    """attention(backend='triton') on one neighborhood, each NBHD_ORDER: forward, forward+backward (flex's in
    the same run), outputs and gradients of two query heads of one group checked against float64 first."""
    from attnzoo.backends import triton as tb

    L = q.shape[2]
    do, (qg, kg, vg), fb_ms, grads, ref, base = _flex_fwdbwd(pname, p, q, k, v, scale, timed, emit, dev, dt, True)
    qs, ks, vs = q[:, :2], k[:, :1], v[:, :1]
    saved = tb.NBHD_ORDER
    try:
        for order in tb.NBHD_ORDERS:
            tb.NBHD_ORDER = order
            row = dict(pattern=pname, L=L, variant=f"attention() {order}")
            try:
                got = grads(lambda a, b, c: az.attention(a, b, c, p, backend="triton", scale=scale), qs, ks, vs)
                row["rel_rmse_vs_fp64"] = max(rel_rmse(a, r_) for a, r_ in zip(got, ref))
                for gname, a, r_, bl in zip(("out", "dq", "dk", "dv"), got, ref, base or (None,) * 4):
                    check_close(gname, a, r_, baseline=bl)
                ms, r = timed(lambda: az.attention(q, k, v, p, backend="triton", scale=scale))
                fb, r2 = timed(lambda: torch.autograd.backward(
                    az.attention(qg, kg, vg, p, backend="triton", scale=scale), do))
                row.update(fwd_ms=ms, fwdbwd_ms=fb, fwd_tflops=fl / ms / 1e9 if ms else None,
                           fwdbwd_tflops=3.5 * fl / fb / 1e9 if fb else None,
                           flex_over_triton=flex_fwd_ms / ms if ms and flex_fwd_ms else None,
                           fwdbwd_flex_over_triton=fb_ms / fb if fb and fb_ms else None,
                           message=r.get("message") or r2.get("message"))
            except Exception as e:  # noqa: BLE001
                row.update(status="error", message=f"{type(e).__name__}: {e}"[:300])
            emit(row)
    finally:
        tb.NBHD_ORDER = saved


def print_table(rows):
    print("(backward rows: TF/s and flex/tri are of the forward+backward, bwd counted as 2.5x the forward's flops)")
    print(f"\n{'pattern':<14} {'variant':<26} {'fwd ms':>8} {'bwd ms':>8} {'TF/s':>6} {'flex/tri':>8} {'visit':>6} "
          f"{'part':>5}  note")
    for r in rows:
        ms = r.get("fwd_ms")
        ratio = r.get("flex_over_triton")
        note = r.get("message") or ""
        if r.get("status") != "error" and "rel_rmse_vs_fp64" in r:
            note = f"err {r['rel_rmse_vs_fp64']:.1e} {note}".strip()
        visit = f"{r['visit']:.2f}" if "visit" in r else "-"
        part = f"{r['partial_share']:.2f}" if "partial_share" in r else "-"
        bms = r.get("bwd_ms") or r.get("fwdbwd_ms")
        if r.get("fwdbwd_flex_over_triton"):
            note = f"fwd+bwd flex/tri {r['fwdbwd_flex_over_triton']:.2f} {note}"
        print(f"{r['pattern']:<14} {r['variant']:<26} {ms if ms is None else round(ms, 3)!s:>8} "
              f"{'-' if bms is None else round(bms, 3)!s:>8} "
              f"{'-' if r.get('fwd_tflops') is None else round(r['fwd_tflops'])!s:>6} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>8} {visit:>6} {part:>5}  {note[:60]}")


if __name__ == "__main__":
    main()
