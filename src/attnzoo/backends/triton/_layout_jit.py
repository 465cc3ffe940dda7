"""What the fused layout kernels share (`routed_layout`, `band_layout`): one program walks one layout line
(a query block's row, or a key block's column for the transposed layout) in chunks, and appends each chunk's
partial and full blocks to the line's two lists with an in-register prefix sum."""
import triton
import triton.language as tl


@triton.jit
def _line_lists(IDX, H, NL, NO, line, h):
    # this line's partial list and full list in IDX (2, H, NL, NO)
    return IDX + (h.to(tl.int64) * NL + line) * NO, IDX + ((H + h).to(tl.int64) * NL + line) * NO


@triton.jit
def _line_chunk(line, o0, NO, CH: tl.constexpr, TRANS: tl.constexpr):
    # entries o0 .. o0 + CH of the line: (entries, in range, query block i, key block j)
    oo = o0 + tl.arange(0, CH)
    if TRANS:  # a key block's column: the other coordinate runs over query blocks
        i = oo
        j = line + 0 * oo
    else:
        i = line + 0 * oo
        j = oo
    return oo, oo < NO, i, j


@triton.jit
def _append(out_p, out_f, base_p, base_f, oo, part, full):
    # append the chunk's partial / full entries after the base_p / base_f already written -> new counts
    fp = part.to(tl.int32)
    ff = full.to(tl.int32)
    tl.store(out_p + base_p + tl.cumsum(fp, 0) - 1, oo, mask=part)
    tl.store(out_f + base_f + tl.cumsum(ff, 0) - 1, oo, mask=full)
    return base_p + tl.sum(fp, 0), base_f + tl.sum(ff, 0)
