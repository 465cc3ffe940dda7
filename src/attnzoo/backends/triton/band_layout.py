"""The block layout of a banded pattern in one generated Triton kernel (classification and compaction fused).

`Pattern.block_layout` builds a layout with 20-60 small PyTorch ops: on a GPU each is a launch of 15-20 us
of host time, so at 64K tokens a window's layout cost 0.56 ms and sinks + window 1.31 ms, 10 % and 23 % of
the forward they prepare (H100, BENCHMARKS.md). Here one launch does it all, one program per layout line
(a query block's row, or a key block's column for the transposed layout the backward walks):

- The pattern's per-row block ranges are generated from the patterns' own `_band` code, run once on a
  tracing `Rows` whose arrays are Triton expressions: each band leaf (full, causal, windows, sinks, chunks,
  prefix-LM, documents) gives, per query block, the visited kv blocks ``a0..a1`` and the fully visible
  ``f0..f1`` among them, so a block's class (0 not visited, 1 partial, 2 full) is two range tests. The
  geometry (offset, lengths, block sizes) stays a runtime argument: one compiled kernel per pattern.
- Unions, intersections and `PerHead` combine the operands' classes per block (union: full if either is
  full; intersection: visited if both are). A block partial in both operands is *unsure* (3): it may be
  empty (intersection) or full (union). The program settles each unsure block of its line by evaluating
  the pattern's generated `_mask` (`codegen`) over the block's tile and counting (a few per line: e.g. the
  sink column where a window's edge crosses it, or a document boundary on the causal diagonal).
- Each chunk of the line is appended to the partial and the full list with an in-register prefix sum.
  Nothing else is written: entries past a list's count are left as they were (the kernels read only the
  counts; `BlockLayout` documents padding as arbitrary).

Patterns with a leaf outside the band family (dilated, strided, power, neighborhoods, block-sparse,
routed, `Mask`) are not taken (`supported` says why); their layouts keep the PyTorch path. The tests
compare both layouts with `Pattern.block_layout` on every band leaf and composite, cross attention both
ways, ragged lengths and odd block sizes (Triton's CPU interpreter).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl  # noqa: F401  (the generated module imports it itself)

from ...patterns import BlockLayout, Intersection, Pattern, PerHead, Union
from ...patterns.base import Rows
from .codegen import _by_head, _Gen, Unsupported, generate
from .codegen import supports as codegen_supports
from .kernels import kernel_module


class _Expr:
    """An int or bool Triton expression of the generated `_cls` function: Python operators append
    statements to the generator and return new expressions, so band code written for arrays runs on it."""
    __slots__ = ("g", "src")

    def __init__(self, g: "_ClsGen", src: str):
        self.g, self.src = g, src

    def _op(self, fmt: str, *args) -> "_Expr":
        return self.g.expr(fmt.format(*(_src(a) for a in args)))

    def __add__(self, o): return self._op("({} + {})", self, o)
    def __radd__(self, o): return self._op("({} + {})", o, self)
    def __sub__(self, o): return self._op("({} - {})", self, o)
    def __rsub__(self, o): return self._op("({} - {})", o, self)
    def __mul__(self, o): return self._op("({} * {})", self, o)
    def __rmul__(self, o): return self._op("({} * {})", o, self)
    def __floordiv__(self, o): return self._op("_fdiv({}, {})", self, o)  # Python's floor, not C's truncation
    def __rfloordiv__(self, o): return self._op("_fdiv({}, {})", o, self)
    def __mod__(self, o): return self._op("_fmod({}, {})", self, o)
    def __neg__(self): return self._op("(-{})", self)
    def __eq__(self, o): return self._op("({} == {})", self, o)  # type: ignore[override]
    def __ne__(self, o): return self._op("({} != {})", self, o)  # type: ignore[override]
    def __lt__(self, o): return self._op("({} < {})", self, o)
    def __le__(self, o): return self._op("({} <= {})", self, o)
    def __gt__(self, o): return self._op("({} > {})", self, o)
    def __ge__(self, o): return self._op("({} >= {})", self, o)
    def __and__(self, o): return self._op("({} & {})", self, o)
    def __or__(self, o): return self._op("({} | {})", self, o)
    def __invert__(self): return self._op("(~{})", self)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise Unsupported("band code branches on a value known only in the kernel")


def _src(x) -> str:
    if isinstance(x, _Expr):
        return x.src
    if isinstance(x, bool) or not isinstance(x, int):
        raise Unsupported(f"band code uses a {type(x).__name__} ({x!r}); the layout kernel takes ints")
    return str(x) if x >= 0 else f"({x})"


class _Table:
    """A lookup table of band code (`Rows.array`), placed in the kernel's AUX buffer; indexing it loads."""

    def __init__(self, g: "_ClsGen", t: torch.Tensor):
        if t.dim() != 1 or t.numel() == 0:
            raise Unsupported("band tables must be non-empty vectors")
        if t.numel() and (int(t.max()) >= 2**31 or int(t.min()) < -2**31):
            raise Unsupported("band table values do not fit in int32")
        self.g, self.n, self.off = g, t.numel(), g.add_aux(t)

    def __getitem__(self, idx):
        i = _src(idx)
        return self.g.expr(f"tl.load(AUX + {self.off} + tl.minimum(tl.maximum({i}, 0), {self.n - 1}))")


class _TraceRows(Rows):
    """`Rows` whose arrays are kernel expressions of the query-block vector ``i`` (see `Rows`): the kv-block
    helpers it inherits (`first_k1_ge`, ...) run unchanged. Geometry comes from the kernel's arguments
    (OFF, LK, BQ, BK, NK), and the ragged branches are always taken (they are no-ops on even lengths)."""

    def __init__(self, g: "_ClsGen"):  # no Rows.__init__: nothing here is an array
        self.g, self.np = g, False
        self.nk, self.bk, self.kv_len = g.expr("NK"), g.expr("BK"), g.expr("LK")
        self.ragged = True
        self.p0 = g.p0
        self.p1 = g.p1

    @property
    def nq(self):
        raise Unsupported("band code reads the number of query blocks")

    def where(self, cond, a, b):
        return self.g.expr(f"tl.where({_src(cond)}, {_src(a)}, {_src(b)})")

    def clip(self, x, lo, hi):
        return self.g.expr(f"tl.minimum(tl.maximum({_src(x)}, {_src(lo)}), {_src(hi)})")

    def maximum(self, a, b):
        return self.g.expr(f"tl.maximum({_src(a)}, {_src(b)})")

    def minimum(self, a, b):
        return self.g.expr(f"tl.minimum({_src(a)}, {_src(b)})")

    def zeros(self):
        return self.g.expr("(i * 0)")

    def array(self, t: torch.Tensor):
        return _Table(self.g, t)

    def stack(self, xs, axis=-1):
        raise Unsupported("band code stacks arrays")

    def cat(self, xs, axis=0):
        raise Unsupported("band code concatenates arrays")


class _ClsGen(_Gen):
    """Generates ``_cls(i, j, hq, AUX, OFF, LK, BQ, BK, NK)``: the class of block (i, j) for head ``hq``."""

    def __init__(self, lq: int, lk: int):
        super().__init__(lq, lk)
        self.unsure = False  # whether any block can come out 3 (a composite)
        self.p0 = self.expr("(OFF + i * BQ)")
        self.p1 = self.expr(f"tl.minimum({self.p0.src} + (BQ - 1), LK - 1)")

    def expr(self, src: str) -> _Expr:
        return _Expr(self, self.var(src))

    def cls(self, p: Pattern) -> str:
        if isinstance(p, (Union, Intersection)):
            a, b = self.cls(p.a), self.cls(p.b)
            self.unsure = True
            if isinstance(p, Union):  # full if either is; nothing if neither; else the visited one's class
                return self.var(f"tl.where(({a} == 2) | ({b} == 2), 2, tl.where({a} == 0, {b}, "
                                f"tl.where({b} == 0, {a}, 3)))")
            return self.var(f"tl.where(({a} == 0) | ({b} == 0), 0, tl.where({a} == 2, {b}, "
                            f"tl.where({b} == 2, {a}, 3)))")
        if isinstance(p, PerHead):
            return _by_head(self, [self.cls(x) for x in p.patterns])
        if not p._band_leaf:
            raise Unsupported(f"{p!r} has no band form (its layout keeps the PyTorch path)")
        a0, a1, f0, f1 = p._band(_TraceRows(self))
        a0, a1, f0, f1 = (x if isinstance(x, _Expr) else self.expr(_src(x)) for x in (a0, a1, f0, f1))
        vis = self.var(f"(j >= {a0.src}) & (j <= {a1.src})")
        return self.var(f"tl.where({vis} & (j >= {f0.src}) & (j <= {f1.src}), 2, {vis}.to(tl.int32))")


_KERNEL = '''

@triton.jit
def _layout_kernel(NUM, IDX, AUX, H, NL, NO, OFF, LQ, LK, BQ, BK, NK,
                   TRANS: tl.constexpr, SETTLE: tl.constexpr, CH: tl.constexpr, TQ: tl.constexpr,
                   TK: tl.constexpr):
    line = tl.program_id(0)
    h = tl.program_id(1)
    out_p = IDX + (h.to(tl.int64) * NL + line) * NO               # this line's partial list
    out_f = IDX + ((H + h).to(tl.int64) * NL + line) * NO         # and its full list
    base_p = 0
    base_f = 0
    for o0 in range(0, NO, CH):
        oo = o0 + tl.arange(0, CH)
        valid = oo < NO
        if TRANS:  # a key block's column: the other coordinate runs over query blocks
            i = oo
            j = line + 0 * oo
        else:
            i = line + 0 * oo
            j = oo
        code = tl.where(valid, _cls(i, j, h, AUX, OFF, LK, BQ, BK, NK), 0)
        if SETTLE:  # blocks partial in both operands of a composite: count their visible pairs
            u = code == 3
            cu = tl.cumsum(u.to(tl.int32), 0) - 1
            for t in range(tl.sum(u.to(tl.int32), 0)):
                sel = u & (cu == t)
                it = tl.sum(tl.where(sel, i, 0), 0)
                jt = tl.sum(tl.where(sel, j, 0), 0)
                rq = tl.arange(0, TQ)
                rk = tl.arange(0, TK)
                qi = it * BQ + rq
                kk = jt * BK + rk
                ok = ((rq < BQ) & (qi < LQ))[:, None] & ((rk < BK) & (kk < LK))[None, :]
                m = _mask((OFF + qi)[:, None], kk[None, :], h, AUX) & ok
                cnt = tl.sum(tl.sum(m.to(tl.int32), 1), 0)
                area = tl.sum(tl.sum(ok.to(tl.int32), 1), 0)
                code = tl.where(sel, (cnt > 0).to(tl.int32) + (cnt == area).to(tl.int32), code)
        part = code == 1
        full = code == 2
        fp = part.to(tl.int32)
        ff = full.to(tl.int32)
        tl.store(out_p + base_p + tl.cumsum(fp, 0) - 1, oo, mask=part)
        tl.store(out_f + base_f + tl.cumsum(ff, 0) - 1, oo, mask=full)
        base_p += tl.sum(fp, 0)
        base_f += tl.sum(ff, 0)
    tl.store(NUM + h * NL + line, base_p)
    tl.store(NUM + (H + h) * NL + line, base_f)
'''


@functools.lru_cache(maxsize=64)
def _module(pattern, lq: int, lk: int, device: str):
    """(module, aux on device, settle): the mask (for unsure blocks) and `_cls` generated for ``pattern``."""
    mask_lines, mask_aux = generate(pattern, lq, lk)
    g = _ClsGen(lq, lk)
    g.aux_len = 0 if mask_aux is None else mask_aux.numel()    # the band tables go after the mask's
    if mask_aux is not None:
        g.aux.append(mask_aux)
    c = g.cls(pattern)
    cls_src = ("\n\n@triton.jit\ndef _cls(i, j, hq, AUX, OFF, LK, BQ, BK, NK):\n"
               + "".join(f"    {line}\n" for line in g.lines) + f"    return {c}\n")
    mod = kernel_module(mask_lines, cls_src, _KERNEL)
    aux = torch.cat(g.aux) if g.aux else torch.zeros(1, dtype=torch.int32)
    return mod, aux.to(device), g.unsure


@functools.lru_cache(maxsize=256)
def supported(pattern) -> tuple[bool, str]:
    """Whether the layout kernel takes ``pattern`` (band leaves and their unions, intersections, PerHead;
    every node also needs its in-kernel mask), and why not."""
    try:
        _ClsGen(1, 1).cls(pattern)
    except Unsupported as e:
        return False, str(e)
    return codegen_supports(pattern)


def band_layout(pattern: Pattern, lq: int, lk: int, bm: int, bn: int, device, num_heads=None,
                transposed: bool = False) -> BlockLayout:
    """The layout of a supported pattern (see `supported`) in one launch: the same lists as
    ``pattern.block_layout(lq, lk, bm, bn)``, or with ``transposed`` its transpose (per key block, the query
    blocks that see it: a `BlockLayout` with block sizes and lengths swapped). Entries past each list's
    count are unspecified."""
    for name, v in (("q_len", lq), ("kv_len", lk), ("block_q", bm), ("block_k", bn)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"band_layout: {name} must be a positive int, got {v!r}")
    ok, why = supported(pattern)
    if not ok:
        raise ValueError(f"band_layout: {why}")
    pattern.check(lq, lk, num_heads)
    device = torch.device(device)
    mod, aux, settle = _module(pattern, lq, lk, str(device))
    h = pattern._heads(num_heads) if pattern.head_dependent else 1
    nq, nk = -(-lq // bm), -(-lk // bn)
    nl, no = (nk, nq) if transposed else (nq, nk)
    num = torch.empty((2, h, nl), dtype=torch.int32, device=device)
    idx = torch.empty((2, h, nl, no), dtype=torch.int32, device=device)
    ch = min(1024, max(16, triton.next_power_of_2(no)))
    mod._layout_kernel[(nl, h)](num, idx, aux, h, nl, no, lk - lq, lq, lk, bm, bn, nk, TRANS=transposed,
                                SETTLE=settle, CH=ch, TQ=triton.next_power_of_2(bm),
                                TK=triton.next_power_of_2(bn), num_warps=4)
    if transposed:
        return BlockLayout(num[0:1], idx[0:1], num[1:2], idx[1:2], bn, bm, lk, lq)
    return BlockLayout(num[0:1], idx[0:1], num[1:2], idx[1:2], bm, bn, lq, lk)
