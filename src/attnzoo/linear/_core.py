"""Shared machinery of the linear-attention family: argument checks, the packed-sequence driver, and the
two chunked kernels (plus the two one-step updates) that every op of the family reduces to.

Conventions (row vectors, as in the papers' code): q_t, k_t are (Dk,) rows, v_t is a (Dv,) row, the state
S is (Dk, Dv) and the output is o_t = q_t S_t (``scale`` is already folded into q here). Gates are given in
log space, per step: ``g`` is None (no decay), "scalar" (B, H, T) or "vector" (B, H, T, Dk).

Gated linear recurrence (linear attention, decayed linear attention, GLA)::

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t

Gated delta recurrence (DeltaNet, Gated DeltaNet, KDA; a scalar gate commutes with the projection)::

    S_t = (I - beta_t k_t^T k_t) diag(exp g_t) S_{t-1} + beta_t k_t^T v_t

Chunked form (Lightning Attention-2 tiling)
-------------------------------------------
The sequence is cut into chunks of C steps (the last one zero-padded: a padded step has k = v = 0,
g = 0, beta = 0, i.e. it is the identity on the state). Inside chunk n, with S the state before it and
Gamma_{i,j} = exp(sum_{j < t <= i} g_t) the decay from step j to step i (per channel for vector gates)::

    o_i = (q_i * Gamma_{i,start}) S  +  sum_{j <= i} [sum_d q_id k_jd Gamma_{i,j,d}] u_j
    S'  = Gamma_{end,start} S + sum_j (k_j * Gamma_{end,j})^T u_j

with u_j = v_j for the gated linear recurrence. For the delta family, u_j is the chunk's "pseudo-value"
(WY representation / UT transform): u_t = beta_t (v_t - k_t diag(exp g_t) S_{t-1}) satisfies, within a
chunk, the unit lower-triangular system::

    u_i + sum_{j < i} beta_i [sum_d k_id k_jd Gamma_{i,j,d}] u_j = beta_i (v_i - (k_i * Gamma_{i,start}) S)

so U = U0 - W S with [U0 | W] = (I + A)^{-1} [beta V | beta (K * Gamma_{.,start})], one
``torch.linalg.solve_triangular`` per chunk, vectorised over batch, heads and chunks. Only the running
state goes through the Python loop over chunks.

Numerics of the gates
---------------------
Every decay factor is exp of a *segment sum* of gates, sum_{j < t <= i} g_t, computed as a sum of the
gates themselves (masked cumulative sums, reverse cumulative sums, sums over whole sub-chunks), never as
a difference of two prefix sums. With g <= 0 every exponent is <= 0 (nothing can overflow) and has no
cancellation error, so a channel that decays by e^-300 inside a chunk costs no precision in the others.
Masked (acausal) entries get exponent -inf before exp, so their gradients are exactly 0, never NaN.

For per-channel (vector) gates, the intra-chunk score sum_d a_id b_jd Gamma_{i,j,d} cannot be a single
matmul of rescaled rows without risking overflow (the usual q * exp(G_i), k * exp(-G_j) split). We use
sub-chunks of ``SUBCHUNK`` steps: pairs (i, j) in the same sub-chunk are computed exactly with a
(c, c, Dk) tensor of segment sums; pairs in different sub-chunks s < p factor through the boundary at the
end of the key's sub-chunk s: Gamma_{i,j} = Gamma_{i,end(s)} Gamma_{end(s),j}, both factors <= 1, and
the sum over channels is a matmul. Extra memory: about (SUBCHUNK + C / SUBCHUNK) x the size of q.
"""
from __future__ import annotations

import importlib.util
import math
import os
from numbers import Real

import torch

MODES = ("chunk", "recurrent", "naive")
SUBCHUNK = 16


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, x, ndim: int, layout: str, device: torch.device | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; put all inputs on one device")


def check_qkv(q, k, v, step: bool = False) -> None:
    """q, k: (B, H, T, Dk), v: (B, H, T, Dv) (or (B, H, D) for one decoding step)."""
    nd, lay = (3, "(batch, heads, dim)") if step else (4, "(batch, heads, length, dim)")
    check_tensor("q", q, nd, lay)
    check_tensor("k", k, nd, lay, q.device)
    check_tensor("v", v, nd, lay, q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in (batch, heads{'' if step else ', length'}) {tuple(q.shape[:-1])}, "
                         f"got {tuple(v.shape[:-1])}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("q, k, v must have a non-empty head dimension")


def check_gate(name: str, g, shape: tuple, layout: str, device) -> None:
    check_tensor(name, g, len(shape), layout, device)
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(g.shape)}")


def check_scale(scale, dk: int) -> float:
    if scale is None:
        return dk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_bool(name: str, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_cu_seqlens(cu_seqlens, batch: int, length: int, device) -> list[int] | None:
    """Validate packed-sequence boundaries; returns them as a Python list (None when not packed)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 boundaries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along length: batch must be 1, got {batch}")
    offs = [int(x) for x in cu_seqlens.tolist()]
    if offs[0] != 0 or offs[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {length}, got {offs[0]}..{offs[-1]}")
    if any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return offs


def check_state(name: str, s, shape: tuple, device) -> None:
    lay = "(num_sequences or batch, heads, key_dim, value_dim)"
    check_tensor(name, s, 4, lay, device)
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {lay} = {tuple(shape)}, got {tuple(s.shape)}")


# ----------------------------------------------------------------------------------------------------------
# packed sequences
# ----------------------------------------------------------------------------------------------------------

def run_sequences(fn, tensors: list, state, offsets: list[int] | None, batched: bool = True):
    """Run ``fn(*tensors, state) -> (o, final_state)`` once, or for each packed sequence.

    ``tensors`` hold time in dim 2 (None entries pass through). With ``offsets`` (B = 1) each sequence
    [offsets[n], offsets[n+1]) starts from ``state[n]`` (zeros when None) and its final state is row n of
    the returned (N, H, Dk, Dv) state. ``batched`` (the Triton kernels; the chunked and recurrent PyTorch
    forms on CUDA): sequences of similar length run as one batch, each padded at its end with zero steps
    (k = v = 0, log gate 0, beta 0: every recurrence here leaves its state unchanged on such a step, and the
    padded outputs are dropped), so N sequences cost a few calls (`length_buckets`) instead of N launches of
    every kernel; else (the naive reference, and PyTorch on the CPU, where padding costs more than the loop
    saves) one call per sequence."""
    if offsets is None:
        return fn(*tensors, state)
    if not batched:
        outs, finals = [], []
        for n in range(len(offsets) - 1):
            a, b = offsets[n], offsets[n + 1]
            s0 = None if state is None else state[n:n + 1]
            o, s = fn(*[None if t is None else t[:, :, a:b] for t in tensors], s0)
            outs.append(o)
            finals.append(s)
        return torch.cat(outs, 2), torch.cat(finals, 0)
    lens = [offsets[n + 1] - offsets[n] for n in range(len(offsets) - 1)]
    total = offsets[-1]
    dev = next(t for t in tensors if t is not None).device
    v = tensors[2] if tensors[2] is not None else tensors[0]
    buckets = length_buckets(lens, group_cost=group_tokens(tensors[0].shape[1], tensors[0].shape[-1], v.shape[-1]))
    # every index the call needs, built on the host in one piece and copied to the device once: per group the
    # packed position of (sequence, step), past a sequence's end the zero step at `total`; then each
    # sequence's rows in the concatenated group outputs; then the sequences in group order, and its inverse
    parts, start, row, shapes = [], {}, 0, []
    for bucket in buckets:
        tm = max(1, max(lens[n] for n in bucket))  # a group of empty sequences runs one zero step
        steps = torch.arange(tm)[None, :]
        blen = torch.tensor([lens[n] for n in bucket])[:, None]
        parts.append(torch.where(steps < blen, steps + torch.tensor([offsets[n] for n in bucket])[:, None],
                                 total).reshape(-1))
        shapes.append((len(bucket), tm))
        for i, n in enumerate(bucket):
            start[n] = row + i * tm  # sequence n's first row in the concatenated outputs
        row += len(bucket) * tm
    parts.append(torch.cat([torch.arange(lens[n]) + start[n] for n in range(len(lens))]))
    order = torch.tensor([n for bucket in buckets for n in bucket])  # the sequences, group after group
    parts += [order, torch.argsort(order)]
    allp = torch.cat(parts).to(dev, non_blocking=True)
    idx = allp[:row]  # the groups' gathers, one after the other
    src = allp[row:row + total]
    nseq = len(lens)
    order, back = allp[row + total:row + total + nseq], allp[row + total + nseq:]
    gsz = [len(bucket) for bucket in buckets]
    # each input with one zero step appended at position `total`, where the padding reads (B = 1 dropped),
    # gathered for every group at once and split into the groups (`_gather`: its backward is the inverse gather by
    # `src`, where indexing with a repeated index accumulates through a sort-based index_put, 67 % of the device
    # time of a packed fwd+bwd on the H100, and index_select's own backward adds through atomics)
    sizes = [nb * tm for nb, tm in shapes]
    split = [None if t is None else _gather(t[0], idx, src, 1, pad_fwd=True).split(sizes, 1) for t in tensors]
    # the initial states in group order (one gather, split), the final states back in sequence order (one gather)
    states = [None] * len(buckets) if state is None else \
        _gather(state, order.to(state.device), back.to(state.device), 0).split(gsz)
    outs, finals = [], []
    for gi, (nb, tm) in enumerate(shapes):
        # (H, nb tm, ...) -> (nb, H, tm, ...): q, k, v as strided views (the kernels take their strides, no
        # copy), the gates and beta copied contiguous (some kernels index them as (B H, T))
        o, s = fn(*[None if x is None else _group_view(x[gi], nb, tm) for x in split], states[gi])
        finals.append(s)
        outs.append(o.movedim(0, 1).reshape(o.shape[1], -1, *o.shape[3:]))   # (H, sequences x tm, ...)
    o = _gather(torch.cat(outs, 1), src, idx, 1, pad_bwd=True).unsqueeze(0)
    s = torch.cat(finals, 0)
    return o, _gather(s, back.to(s.device), order.to(s.device), 0)


def _group_view(x, nb, tm):
    """A group's rows (H, nb tm, ...) as (nb, H, tm, ...): a strided view for 4-D inputs (q, k, v) whose last
    dimension stays contiguous, a contiguous copy otherwise."""
    y = x.unflatten(1, (nb, tm)).movedim(1, 0)
    return y if y.dim() == 4 and y.stride(-1) == 1 else y.contiguous()


def _pad_select(x, dim, idx, pad):
    """x.index_select(dim, idx), with one zero row appended along dim first when ``pad`` (index x.shape[dim])."""
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[:dim] + (1,) + x.shape[dim + 1:])], dim)
    return x.index_select(dim, idx)


class _Gather(torch.autograd.Function):
    """y = x.index_select(dim, idx) where every row of x lands in y exactly once, at position inv[row] (a
    permutation, or the packed rows into padded groups), with ``pad`` rows of y past x's end reading a zero row
    (``pad_fwd``). Its backward is the adjoint gather, grad.index_select(dim, inv), where padded positions of y
    read a zero row too when ``pad_bwd`` (inv then points past grad's end for them): both directions are plain
    row gathers (no index_copy / index_put: on the H100 index_copy_ along dim 1 took 3.4 of 15.6 ms device time
    of a packed fwd+bwd of 512 sequences, benchmarks/results/h100-2026-12-05-s13/call4/packed_profile_512.txt)."""

    @staticmethod
    def forward(ctx, x, idx, inv, dim, pad_fwd, pad_bwd):
        ctx.save_for_backward(inv)
        ctx.dim, ctx.pad_bwd = dim, pad_bwd
        return _pad_select(x, dim, idx, pad_fwd)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return _pad_select(grad, ctx.dim, inv, ctx.pad_bwd), None, None, None, None, None


def _gather(x, idx, inv, dim=1, pad_fwd=False, pad_bwd=False):
    """`_Gather` (x.index_select(dim, idx), backward by the inverse gather ``inv``) when a gradient is wanted."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x, idx, inv, dim, pad_fwd, pad_bwd)
    return _pad_select(x, dim, idx, pad_fwd)


# How packed sequences are grouped in `run_sequences`. Each group is one call of the op: its launches and autograd
# nodes cost host time (about 1.6 ms per group for Gated DeltaNet's fwd+bwd on the H100, where the packed path is
# host-bound), while each padded token costs device time in proportion to H x Dk x Dv. The groups minimise
# padded tokens + groups x PACK_GROUP_WORK / (H Dk Dv): one group is worth 4096 padded tokens at H = 16,
# Dk = Dv = 128. H100, 2026-12-05, fwd+bwd, two runs of two rounds each (benchmarks/results/h100-2026-12-05-s13/
# call4, call5): 64 sequences of 64-512 tokens, 2 groups (what 4096 and 8192 pick) 8.5-11.4 ms against 3 groups
# 9.0-11.0, 1 group 8.9-12.1 and the old greedy bound (4 groups) 12.7-13.8; 128 sequences of 128-2048 tokens,
# 7 groups (2048) 43.2-46.6 ms against 4 groups (8192) 45.4-50.1, 2 groups 50.8-60.8, greedy (6) 49.7-52.9;
# 4096 picks 6 groups there, 3 % more padding than 7. When the device is the bottleneck, extra groups' host time
# hides under it, so a cost per group overstates them there; the sum is the simple, safe side of that.
PACK_GROUP_WORK = 4096 * 16 * 128 * 128


def group_tokens(h: int, dk: int, dv: int) -> int:
    """The padded tokens one more group is worth (`PACK_GROUP_WORK` / (h dk dv), at least 1)."""
    return max(1, PACK_GROUP_WORK // max(1, h * dk * dv))


def length_buckets(lens: list[int], waste: float | None = None, group_cost: int | None = None) -> list[list[int]]:
    """Sequence indices grouped for padded batches, longest first (each group runs as count x its longest).

    By default (``waste`` None) the grouping of the length-sorted sequences into runs that minimises padded
    tokens + ``group_cost`` x groups (``group_cost`` defaults to `group_tokens` (16, 128, 128)), exactly, by a
    dynamic programme over split points with a monotone convex hull (O(n log n) for the sort, O(n) after). With
    ``waste``, the greedy rule: a sequence joins the current group while its padded size stays within ``waste``
    x its real tokens. Empty sequences join the last group (padded, they leave their state unchanged)."""
    if waste is not None and not waste >= 1.0:
        raise ValueError(f"length_buckets: waste must be >= 1, got {waste!r}")
    if group_cost is not None and (isinstance(group_cost, bool) or not isinstance(group_cost, int) or group_cost < 0):
        raise ValueError(f"length_buckets: group_cost must be an int >= 0, got {group_cost!r}")
    order = sorted(range(len(lens)), key=lambda n: -lens[n])
    full = [n for n in order if lens[n] > 0]
    empty = order[len(full):]
    if waste is not None:
        groups, cur, real = [], [], 0
        for n in full:
            if cur and (len(cur) + 1) * lens[cur[0]] > waste * (real + lens[n]):
                groups.append(cur)
                cur, real = [], 0
            cur.append(n)
            real += lens[n]
        if cur:
            groups.append(cur)
    else:
        groups = [[full[i] for i in range(a, b)] for a, b in _cheapest_runs([lens[n] for n in full],
                                                                              group_tokens(16, 128, 128)
                                                                              if group_cost is None else group_cost)]
    if empty:
        if groups:
            groups[-1] += empty
        else:
            groups = [empty]
    return groups


def _cheapest_runs(desc: list[int], cost: int) -> list[tuple[int, int]]:
    """Split lengths sorted in descending order into runs [a, b) minimising sum((b - a) desc[a]) + cost x runs.

    f[j] = min_i f[i] + cost + (j - i) desc[i]: each i is a line of slope desc[i] (falling with i) and intercept
    f[i] - i desc[i], queried at x = j (rising), so the best line only moves forward (a monotone hull; exact,
    integers throughout)."""
    n = len(desc)
    f = [0] * (n + 1)
    arg = [0] * (n + 1)
    hull = []                              # indices i whose lines form the lower envelope, slopes decreasing
    head = 0

    def icpt(i):
        return f[i] - i * desc[i]

    def useless(a, b, c):                  # line b never below both a and c (slopes a > b > c, or equal)
        # b is dominated where (icpt_c - icpt_a)(s_a - s_b) <= (icpt_b - icpt_a)(s_a - s_c)
        return (icpt(c) - icpt(a)) * (desc[a] - desc[b]) <= (icpt(b) - icpt(a)) * (desc[a] - desc[c])

    for j in range(1, n + 1):
        i = j - 1                          # the line for runs starting at i, available from x = j on
        while len(hull) > head and desc[hull[-1]] == desc[i]:
            if icpt(hull[-1]) <= icpt(i):
                break
            hull.pop()
        else:
            while len(hull) - head >= 2 and useless(hull[-2], hull[-1], i):
                hull.pop()
            hull.append(i)
        head = min(head, len(hull) - 1)
        while len(hull) - head >= 2 and icpt(hull[head + 1]) + j * desc[hull[head + 1]] <= \
                icpt(hull[head]) + j * desc[hull[head]]:
            head += 1
        best = hull[head]
        f[j] = icpt(best) + j * desc[best] + cost
        arg[j] = best
    runs, j = [], n
    while j > 0:
        runs.append((arg[j], j))
        j = arg[j]
    return runs[::-1]


def zeros_state(q, v, state):
    if state is not None:
        return state
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# gate algebra (all exponents are segment sums of the gates themselves: no cancellation)
# ----------------------------------------------------------------------------------------------------------

def segsum(g: torch.Tensor, strict: bool) -> torch.Tensor:
    """g (..., C, K) -> (..., C, C, K): out[..., i, j, :] = sum_{j < t <= i} g_t where visible, -inf elsewhere.

    Visible means j <= i (j < i when ``strict``). Computed by a masked cumulative sum over i, so each entry
    is a plain sum of gates.
    """
    c = g.shape[-2]
    idx = torch.arange(c, device=g.device)
    after = (idx[:, None] > idx[None, :])[..., None]  # t = i contributes to (i, j) when i > j
    x = g.unsqueeze(-2).expand(*g.shape[:-2], c, c, g.shape[-1]).masked_fill(~after, 0.0)
    s = x.cumsum(-3)
    visible = (idx[:, None] - idx[None, :] >= (1 if strict else 0))[..., None]
    return s.masked_fill(~visible, float("-inf"))


def rev_cumsum_exclusive(g: torch.Tensor, dim: int) -> torch.Tensor:
    """out_j = sum_{t > j} g_t along ``dim`` (a plain sum of the later gates)."""
    gs = g.narrow(dim, 1, g.shape[dim] - 1)
    gs = torch.cat([gs, torch.zeros_like(g.narrow(dim, 0, 1))], dim)
    return gs.flip(dim).cumsum(dim).flip(dim)


def _causal_mask(c: int, strict: bool, device) -> torch.Tensor:
    idx = torch.arange(c, device=device)
    return idx[:, None] - idx[None, :] >= (1 if strict else 0)


def gated_scores(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None, strict: bool) -> torch.Tensor:
    """M_ij = sum_d a_id b_jd exp(sum_{j < t <= i} g_t[d]) for j <= i (j < i if ``strict``), else 0.

    a, b: (..., C, K); g: None (no gate), (..., C) scalar gates, or (..., C, K) per-channel gates.
    """
    c = a.shape[-2]
    if g is None:
        return (a @ b.transpose(-1, -2)).masked_fill(~_causal_mask(c, strict, a.device), 0.0)
    if g.dim() == a.dim() - 1:  # scalar gate: an exact (C, C) decay matrix
        return (a @ b.transpose(-1, -2)) * segsum(g.unsqueeze(-1), strict).squeeze(-1).exp()
    return _vector_gated_scores(a, b, g, strict)


def _vector_gated_scores(a, b, g, strict):
    *lead, c, k = a.shape
    sc = min(SUBCHUNK, c)
    ns = -(-c // sc)
    cp = ns * sc
    if cp != c:  # zero-pad the chunk to whole sub-chunks (padded rows/columns are cut off at the end)
        pad = [0, 0, 0, cp - c]
        a, b, g = (torch.nn.functional.pad(t, pad) for t in (a, b, g))
    a, b, g = (t.reshape(*lead, ns, sc, k) for t in (a, b, g))

    # pairs inside one sub-chunk: exact, with a (sc, sc, K) tensor of segment sums
    diag = (a.unsqueeze(-2) * b.unsqueeze(-3) * segsum(g, strict).exp()).sum(-1)  # (..., ns, sc, sc)
    eye = torch.eye(ns, dtype=a.dtype, device=a.device)
    full = (diag.unsqueeze(-2) * eye[:, None, :, None]).reshape(*lead, cp, cp)
    if ns == 1:
        return full[..., :c, :c]

    # pairs (i in sub-chunk p, j in sub-chunk s < p): factor through the end of sub-chunk s
    into = g.cumsum(-2)                                # sum of gates from the start of i's sub-chunk to i
    tail = rev_cumsum_exclusive(g, -2)                 # sum of gates after j to the end of j's sub-chunk
    tot = g.sum(-2)                                    # (..., ns, K): whole sub-chunks
    m = torch.arange(ns, device=a.device)
    between = ((m[None, :, None] < m[None, None, :]) & (m[None, None, :] < m[:, None, None])).to(a.dtype)
    gap = torch.einsum("psm,...mk->...psk", between, tot)   # gates of the sub-chunks strictly between s and p
    later = (m[:, None] > m[None, :])                        # (p, s): p after s
    expo = into.unsqueeze(-3) + gap.unsqueeze(-2)            # (..., p, s, sc, K)
    expo = expo.masked_fill(~later[:, :, None, None], float("-inf"))
    at = a.unsqueeze(-3) * expo.exp()                        # query rows, rescaled to the boundary of s
    bt = b * tail.exp()                                      # key rows, rescaled to the end of their sub-chunk
    off = torch.einsum("...psik,...sjk->...pisj", at, bt).reshape(*lead, cp, cp)
    return (full + off)[..., :c, :c]


def gate_factors(g: torch.Tensor | None, vector: bool):
    """Per-chunk decay factors for chunked gates g (..., C) or (..., C, K).

    Returns (from_start, to_end, total): exp of the gates summed from the chunk start to i (inclusive),
    from after j to the chunk end, and over the whole chunk; broadcastable against (..., C, K) rows and the
    (..., K, V) state. None when there is no gate.
    """
    if g is None:
        return None, None, None
    if not vector:
        g = g.unsqueeze(-1)
    from_start = g.cumsum(-2).exp()
    to_end = rev_cumsum_exclusive(g, -2).exp()
    total = g.sum(-2).exp().unsqueeze(-1)  # (..., K, 1) or (..., 1, 1) for scalar gates
    return from_start, to_end, total


def _pad_time(t: torch.Tensor | None, n: int, c: int):
    """(B, H, T, ...) -> (B, H, n, c, ...), zero-padded in time."""
    if t is None:
        return None
    length = t.shape[2]
    if n * c != length:
        pad = [0, 0] * (t.dim() - 3) + [0, n * c - length]
        t = torch.nn.functional.pad(t, pad)
    return t.reshape(t.shape[0], t.shape[1], n, c, *t.shape[3:])


# ----------------------------------------------------------------------------------------------------------
# chunked kernels
# ----------------------------------------------------------------------------------------------------------

def chunk_gated_linear(q, k, v, g, state, chunk_size: int):
    """S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t, chunk by chunk. g: None, (B,H,T) or (B,H,T,K)."""
    b, h, length, dk = q.shape
    dv = v.shape[-1]
    s = zeros_state(q, v, state)
    if length == 0:
        return v.new_zeros(b, h, 0, dv), s
    vector = g is not None and g.dim() == 4
    c = min(chunk_size, length)
    n = -(-length // c)
    q, k, v, g = (_pad_time(t, n, c) for t in (q, k, v, g))
    scores = gated_scores(q, k, g, strict=False)             # (B, H, n, C, C)
    from_start, to_end, total = gate_factors(g, vector)
    qs = q if g is None else q * from_start                  # queries seen from the chunk start
    ke = k if g is None else k * to_end                      # keys carried to the chunk end
    kv = ke.transpose(-1, -2) @ v                            # (B, H, n, K, V): each chunk's contribution
    starts = []
    for i in range(n):
        starts.append(s)
        s = (s if g is None else total[:, :, i] * s) + kv[:, :, i]
    o = qs @ torch.stack(starts, 2) + scores @ v
    return o.reshape(b, h, n * c, dv)[:, :, :length], s


def chunk_gated_delta(q, k, v, g, beta, state, chunk_size: int):
    """S_t = (I - beta_t k_t^T k_t) diag(exp g_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t, chunk by chunk."""
    b, h, length, dk = q.shape
    dv = v.shape[-1]
    s = zeros_state(q, v, state)
    if length == 0:
        return v.new_zeros(b, h, 0, dv), s
    vector = g is not None and g.dim() == 4
    c = min(chunk_size, length)
    n = -(-length // c)
    q, k, v, g, beta = (_pad_time(t, n, c) for t in (q, k, v, g, beta))
    from_start, to_end, total = gate_factors(g, vector)
    ks = k if g is None else k * from_start
    ke = k if g is None else k * to_end
    qs = q if g is None else q * from_start
    bt = beta.unsqueeze(-1)
    a = gated_scores(k, k, g, strict=True) * bt             # strictly lower: the UT transform's matrix
    rhs = torch.cat([bt * v, bt * ks], -1)
    x = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)  # (I + A)^{-1} rhs
    u0, w = x.split([dv, dk], -1)
    scores = gated_scores(q, k, g, strict=False)
    starts, us = [], []
    for i in range(n):
        starts.append(s)
        u = u0[:, :, i] - w[:, :, i] @ s                     # the chunk's pseudo-values
        us.append(u)
        s = (s if g is None else total[:, :, i] * s) + ke[:, :, i].transpose(-1, -2) @ u
    o = qs @ torch.stack(starts, 2) + scores @ torch.stack(us, 2)
    return o.reshape(b, h, n * c, dv)[:, :, :length], s


# ----------------------------------------------------------------------------------------------------------
# one-step updates (recurrent form and decoding)
# ----------------------------------------------------------------------------------------------------------

def _decay(s, g):
    if g is None:
        return s
    if g.dim() == s.dim() - 2:  # scalar gate (B, H)
        return g.exp()[..., None, None] * s
    return g.exp().unsqueeze(-1) * s  # (B, H, K)


def step_gated_linear(q, k, v, g, s):
    """One token: q, k (B, H, K), v (B, H, V), g None | (B, H) | (B, H, K), s (B, H, K, V)."""
    s = _decay(s, g) + k.unsqueeze(-1) * v.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q, s), s


def step_gated_delta(q, k, v, g, beta, s):
    """One token of the (gated) delta rule: decay, then the rank-1 correction toward v."""
    s = _decay(s, g)
    u = beta.unsqueeze(-1) * (v - torch.einsum("bhk,bhkv->bhv", k, s))
    s = s + k.unsqueeze(-1) * u.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q, s), s


def recurrent(step, q, k, v, g, beta, state):
    """The recurrent form: ``step`` applied token by token, vectorised over batch and heads."""
    s = zeros_state(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        gt = None if g is None else g[:, :, t]
        args = (q[:, :, t], k[:, :, t], v[:, :, t], gt) + (() if beta is None else (beta[:, :, t],))
        o, s = step(*args, s)
        outs.append(o)
    if not outs:
        return v.new_zeros(*v.shape), s
    return torch.stack(outs, 2), s


# ----------------------------------------------------------------------------------------------------------
# the public ops' common driver
# ----------------------------------------------------------------------------------------------------------

_KERNELS = {"linear": (chunk_gated_linear, step_gated_linear), "delta": (chunk_gated_delta, step_gated_delta)}


def forward(kind: str, naive, q, k, v, g, beta, scale, initial_state, output_final_state, mode, cu_seqlens,
            chunk_size):
    """Checks the arguments shared by every op (q, k, v, g, beta were checked by the caller), casts to the
    compute dtype, folds ``scale`` into q and runs the chosen form per batch or per packed sequence.

    naive: ``naive(q, k, v, [g], [beta], state)`` with the op's own arguments (None ones dropped).
    """
    check_bool("output_final_state", output_final_state)
    check_mode(mode)
    check_chunk_size(chunk_size)
    b, h, length, dk = q.shape
    scale = check_scale(scale, dk)
    offsets = check_cu_seqlens(cu_seqlens, b, length, q.device)
    n = b if offsets is None else len(offsets) - 1
    if initial_state is not None:
        check_state("initial_state", initial_state, (n, h, dk, v.shape[-1]), q.device)
    cd = compute_dtype(q.dtype)
    cast = lambda t: None if t is None else t.to(cd)  # noqa: E731
    qc, kc, vc, gc, bc, s0 = (cast(t) for t in (q, k, v, g, beta, initial_state))
    qc = qc * scale
    chunk, step = _KERNELS[kind]
    if mode == "naive":
        def fn(q, k, v, g, beta, s):
            return naive(q, k, v, *(x for x in (g, beta) if x is not None), state=s)
    elif mode == "chunk":
        def fn(q, k, v, g, beta, s):
            return chunk(q, k, v, g, s, chunk_size) if kind == "linear" else chunk(q, k, v, g, beta, s, chunk_size)
    else:
        def fn(q, k, v, g, beta, s):
            return recurrent(step, q, k, v, g, beta, s)
    # padded batches pay off where launches cost (CUDA); on the CPU the padding costs more than the loop saves
    o, s = run_sequences(fn, [qc, kc, vc, gc, bc], s0, offsets, batched=mode != "naive" and q.is_cuda)
    return o.to(q.dtype), (s if output_final_state else None)


def forward_step(kind: str, q, k, v, g, beta, state, scale, backend: str = "auto"):
    """One decoding token for every op: q, k (B, H, Dk), v (B, H, Dv); state (B, H, Dk, Dv) or None (zeros).
    Returns (o (B, H, Dv) in q's dtype, new state in the compute dtype).

    ``backend``: "auto" (the default) runs the fused Triton step kernel (``triton_kernels.step``: the state read
    and written once, float32) where the chunked kernels would run and no gradient is wanted, else PyTorch;
    "torch" always PyTorch; "triton" the kernel or a ValueError saying why not."""
    b, h, dk = q.shape
    scale = check_scale(scale, dk)
    if state is not None:
        check_state("state", state, (b, h, dk, v.shape[-1]), q.device)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, beta, state))
    if use_triton(backend, q, v, "chunk", ["the step kernel is not differentiable (inputs require grad)"] if grad
                  else []):
        from .triton_kernels import step as triton_step
        f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
        return triton_step(q, k, v, f32(g), state, scale, beta=f32(beta))
    cd = compute_dtype(q.dtype)
    cast = lambda t: None if t is None else t.to(cd)  # noqa: E731
    qc, kc, vc, gc, bc = (cast(t) for t in (q, k, v, g, beta))
    s = q.new_zeros(b, h, dk, v.shape[-1], dtype=cd) if state is None else state.to(cd)
    step = _KERNELS[kind][1]
    o, s = step(qc * scale, kc, vc, gc, s) if kind == "linear" else step(qc * scale, kc, vc, gc, bc, s)
    return o.to(q.dtype), s


def use_triton(backend, q, v, mode: str, reasons: list, max_head_dim_is_limit: bool = True) -> bool:
    """Whether a call runs on the Triton kernels: ``backend`` "torch" never, "triton" always (or a ValueError
    listing why it cannot), "auto" on CUDA when the case is covered (on CPU only with
    ATTNZOO_LINEAR_TRITON=1 under TRITON_INTERPRET=1; ATTNZOO_LINEAR_TRITON=0 turns it off). ``reasons``
    are the op's own uncovered cases; head dims above 128 are one too, or (``max_head_dim_is_limit=False``)
    only keep ``auto`` away."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    reasons = list(reasons)
    big = max(q.shape[-1], v.shape[-1]) > 128
    if mode != "chunk":
        reasons.append(f"mode={mode!r}: the kernels implement mode='chunk'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if big and max_head_dim_is_limit:
        reasons.append(f"head dims must be <= 128, got Dk={q.shape[-1]}, Dv={v.shape[-1]}")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or (q.device.type == "cpu" and interp)):
        reasons.append("the inputs must be on CUDA (or on CPU with TRITON_INTERPRET=1)")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    if backend == "triton":
        if reasons:
            raise ValueError("backend='triton': " + "; ".join(reasons))
        return True
    env = os.environ.get("ATTNZOO_LINEAR_TRITON")
    if reasons or env == "0" or big:  # auto: the head dims the kernels were sized for
        return False
    return q.is_cuda or env == "1"
