"""The Triton forward kernel over a `BlockLayout`, specialised per pattern by source generation.

For each (query block, batch x head) program: the fully visible kv blocks run without any mask, then
the partial blocks apply the pattern's mask, generated from the pattern into ``_mask`` (see
`codegen`). Online softmax in base 2 with fp32 accumulation; the lse is written in natural log.
GQA reads the shared K/V head directly (no repeated K/V). Head dims that are not powers of two are
padded to the next one inside the kernel (masked loads), so Dv != D (e.g. 192/128) works.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

PRELUDE = '''
import triton
import triton.language as tl


@triton.jit
def _fdiv(x, s):
    return tl.where(x >= 0, x // s, -((s - 1 - x) // s))


@triton.jit
def _fmod(x, s):
    return x - _fdiv(x, s) * s


@triton.jit
def _mask(qp, kk, hq, AUX):
{body}
'''

FWD = '''

@triton.jit
def _step(s, v, m_i, l_i, acc):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _block(q, kbase, vbase, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Lk, D, DV, qk_scale):
    """Scaled scores of one kv block (keys past Lk at -inf) and its values."""
    kt = tl.load(kbase + offs_n[None, :] * stride_kn + offs_d[:, None],
                 mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
    v = tl.load(vbase + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
    s = tl.dot(q, kt) * qk_scale
    return tl.where(offs_n[None, :] < Lk, s, float("-inf")), v


@triton.jit
def attn_fwd(Q, K, V, O, LSE, AUX, KVN, KVI, FKVN, FKVI,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
             lay_h, lay_m, idx_h, idx_m,
             H, G, Lq, Lk, OFF, D, DV, qk_scale,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    qp = offs_m[:, None] + OFF
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kbase = K + b * stride_kb + hk * stride_kh
    vbase = V + b * stride_vb + hk * stride_vh
    # fully visible blocks: no elementwise mask (only the ragged end of the keys)
    n_full = tl.load(FKVN + h * lay_h + pid_m * lay_m)
    row = FKVI + h * idx_h + pid_m * idx_m
    for j in range(0, n_full):
        offs_n = tl.load(row + j) * BLOCK_N + offs_n0
        s, v = _block(q, kbase, vbase, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Lk, D, DV, qk_scale)
        m_i, l_i, acc = _step(s, v, m_i, l_i, acc)
    # partial blocks: the pattern's mask, computed in-kernel
    n_part = tl.load(KVN + h * lay_h + pid_m * lay_m)
    row = KVI + h * idx_h + pid_m * idx_m
    for j in range(0, n_part):
        offs_n = tl.load(row + j) * BLOCK_N + offs_n0
        s, v = _block(q, kbase, vbase, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Lk, D, DV, qk_scale)
        s = tl.where(_mask(qp, offs_n[None, :], h, AUX), s, float("-inf"))
        m_i, l_i, acc = _step(s, v, m_i, l_i, acc)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_bh * Lq + offs_m, lse, mask=offs_m < Lq)
'''

_lock = threading.Lock()
_modules: dict = {}


def _cache_dir() -> str:
    d = os.environ.get("ATTNZOO_CACHE") or os.path.join(tempfile.gettempdir(), f"attnzoo-{os.getuid()}", "triton")
    os.makedirs(d, exist_ok=True)
    return d


def kernel_module(body_lines: list[str], *sources: str):
    """Import (once) the module made of the prelude with this ``_mask`` body followed by the given kernel
    sources (default: the forward kernel). Triton needs real source files, so it is written to a cache."""
    body = "\n".join("    " + line for line in body_lines)
    src = PRELUDE.format(body=body) + "".join(sources or (FWD,))
    key = hashlib.sha1(src.encode()).hexdigest()[:20]
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        path = os.path.join(_cache_dir(), f"attnzoo_fwd_{key}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        name = f"attnzoo_triton_fwd_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _modules[key] = mod
        return mod
