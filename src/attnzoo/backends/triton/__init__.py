"""attnzoo's own Triton kernels: forward and backward over the block layout, split-K decode for short queries."""
from __future__ import annotations

import torch

from ..base import Backend, Request
from .codegen import supports


def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not installed ({type(e).__name__}); pip install 'attnzoo[gpu]'"
    return True, ""


# Inference calls with at most this many queries (e.g. one new token against a long KV cache) take the
# split-K decode kernel (`decode.attention_decode`), which spreads the keys over the whole GPU.
DECODE_MAX_LQ = 16


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
        if max(req.D, req.Dv) > 256:
            return False, f"head dims above 256 are not supported (D={req.D}, Dv={req.Dv})"
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

        if req.Lq <= DECODE_MAX_LQ and not req.needs_grad:
            from .decode import attention_decode

            out, lse = attention_decode(req.q, req.k, req.v, req.pattern, req.scale)
            return out, (lse if req.return_lse else None)
        tiling = tiled_neighborhood(req)
        if tiling is None:
            out, lse = triton_attention(req.q, req.k, req.v, req.pattern, req.scale)
        else:  # N-D neighborhood: tokens reordered into compact tiles, and back (differentiable gathers)
            perm, inv, tiled = tiling
            q, k, v = (t.index_select(2, perm) for t in (req.q, req.k, req.v))
            out, lse = triton_attention(q, k, v, tiled, req.scale)
            out, lse = out.index_select(2, inv), lse.index_select(2, inv)
        return out, (lse if req.return_lse else None)
