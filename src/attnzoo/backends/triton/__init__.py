"""attnzoo's own Triton kernels: forward and backward over the block layout, split-K decode for short queries."""
from __future__ import annotations

import torch

from ..base import Backend, Request
from .codegen import InPlaceTiled, supports


def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not installed ({type(e).__name__}); pip install 'attnzoo[gpu]'"
    return True, ""


# Inference calls with at most this many queries (e.g. one new token against a long KV cache) take the
# split-K decode kernel (`decode.attention_decode`), which spreads the keys over the whole GPU.
DECODE_MAX_LQ = 16
# Head dims: the forward/backward kernels hold a whole q/k/v row per tile (<= 256); the decode kernel also
# takes wider heads (D chunked for the scores, Dv sliced for the output), e.g. MLA's absorbed decode
# (one latent head, D = kv_rank + rope_dim = 576, Dv = kv_rank = 512).
MAX_HEAD_DIM = 256
DECODE_MAX_HEAD_DIM = 1024
# Full attention over one wide head with the query heads folded into the query axis (MLA's absorbed decode
# of one token calls attention(q (B, 1, H, 576), latent (B, 1, S, 576), ...), so Lq = H): the decode kernel
# takes it with the queries back in the heads, for up to this many (query x group head) rows.
DECODE_FOLD_MAX_ROWS = 256


# How `TritonBackend.run` runs an N-D neighborhood in tile order (`ops.tiled_neighborhood`): "in-place" (the
# kernels map every row to its place, no copies; `codegen.InPlaceTiled`), "in-place-q" (only the query side is
# mapped; K and V are gathered into tile order, and their gradients scattered back, so their row blocks stay
# contiguous for tensor descriptors) or "gather" (q, k, v gathered into tile order, out and lse back: two
# copies of each, four of the gradients). Environment: ATTNZOO_NBHD_ORDER. Under torch.compile always "in-place".
NBHD_ORDERS = ("in-place", "in-place-q", "gather")
NBHD_ORDER = "in-place"


def nbhd_order() -> str:
    import os

    order = os.environ.get("ATTNZOO_NBHD_ORDER") or NBHD_ORDER
    if order not in NBHD_ORDERS:
        raise ValueError(f"ATTNZOO_NBHD_ORDER / NBHD_ORDER must be one of {NBHD_ORDERS}, got {order!r}")
    return order


def decode_route(req: Request) -> bool:
    """Whether `TritonBackend.run` takes the split-K decode kernel for ``req`` (inference calls only)."""
    if req.needs_grad:
        return False
    from ...patterns import RoutedBlocks
    if isinstance(req.pattern, RoutedBlocks):  # a per-call device mask: the forward kernel reads it as is,
        return False                          # the decode kernel's host-built visit lists would copy it
    if req.Lq <= DECODE_MAX_LQ:
        return True
    return (max(req.D, req.Dv) > MAX_HEAD_DIM and req.kind == "full"
            and req.Lq * (req.Hq // req.Hkv) <= DECODE_FOLD_MAX_ROWS)


class TritonBackend(Backend):
    name = "triton"
    description = "attnzoo's fused Triton kernels over the closed-form block layout (forward + deterministic backward)"
    devices = ("cuda", "cpu (TRITON_INTERPRET=1)")
    patterns = "all but Mask(fn)"
    dtypes = "fp16, bf16, fp32"
    grad = "yes (deterministic)"

    def can_run(self, req: Request):
        from .ops import interpreting

        ok, why = triton_available()
        if not ok:
            return False, why
        if req.device.type != "cuda" and not (req.device.type == "cpu" and interpreting()):
            return False, "Triton kernels need CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)"
        if req.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"the Triton kernel does not take {req.dtype}"
        wide = max(req.D, req.Dv)
        if wide > DECODE_MAX_HEAD_DIM:
            return False, f"head dims above {DECODE_MAX_HEAD_DIM} are not supported (D={req.D}, Dv={req.Dv})"
        if wide > MAX_HEAD_DIM and not decode_route(req):
            return False, (f"head dims above {MAX_HEAD_DIM} (D={req.D}, Dv={req.Dv}) run only on the split-K decode "
                           f"kernel: inference (no grad) with Lq <= {DECODE_MAX_LQ}, or full attention of at most "
                           f"{DECODE_FOLD_MAX_ROWS} query x group-head rows; this call has Lq={req.Lq}, "
                           f"G={req.Hq // req.Hkv}, {'grad' if req.needs_grad else 'no grad'}, {req.kind} attention")
        return supports(req.pattern)

    def auto_ok(self, req: Request):
        # Measured on an H100 (BENCHMARKS.md): forward 1.05-1.2x compiled FlexAttention on windows and
        # sinks, 1.5-2.7x on N-D neighborhoods; forward+backward 0.93-1.03x on plain windows, 1.4-2.4x on
        # sinks and neighborhoods; and no compile step. Dense and causal work still goes to SDPA first.
        if req.device.type != "cuda":
            return False, "the CPU interpreter is for testing; auto uses it only on CUDA"
        return True, ""

    def run(self, req: Request):
        from .ops import tiled_neighborhood, triton_attention

        if decode_route(req):
            from .decode import attention_decode

            out, lse = attention_decode(req.q, req.k, req.v, req.pattern, req.scale)
            return out, (lse if req.return_lse else None)
        tiling = None
        if torch.compiler.is_compiling():  # traced: the custom ops; N-D neighborhoods always in place
            from .ops import _fwd_op, in_place_pattern_id

            pid = in_place_pattern_id(req.pattern, req.D, req.Dv, str(req.device), req.dtype)
            if pid >= 0:
                out, lse = _fwd_op(req.q, req.k, req.v, pid, float(req.scale))
                return out, (lse if req.return_lse else None)
        else:
            tiling = tiled_neighborhood(req)
        if tiling is None:
            out, lse = triton_attention(req.q, req.k, req.v, req.pattern, req.scale)
            return out, (lse if req.return_lse else None)
        perm, inv, tiled = tiling
        order = nbhd_order()
        if order == "in-place":  # N-D neighborhood walked in tile order over the tensors as they are
            out, lse = triton_attention(req.q, req.k, req.v, InPlaceTiled(tiled), req.scale)
        elif order == "in-place-q":  # K / V gathered into tile order (differentiable), the query side mapped
            k, v = (t.index_select(2, perm) for t in (req.k, req.v))
            out, lse = triton_attention(req.q, k, v, InPlaceTiled(tiled, kv=False), req.scale)
        else:  # tokens gathered into compact tiles, and back (differentiable gathers)
            q, k, v = (t.index_select(2, perm) for t in (req.q, req.k, req.v))
            out, lse = triton_attention(q, k, v, tiled, req.scale)
            out, lse = out.index_select(2, inv), lse.index_select(2, inv)
        return out, (lse if req.return_lse else None)
