"""Linear and recurrent token mixers: linear attention (feature maps, decay, normalisation), GLA, DeltaNet,
Gated DeltaNet and KDA.

Every op takes q, k, v as (B, H, T, D), gates in log space, an optional recurrent state (B, H, Dk, Dv) and
returns ``(o, final_state)``, in three forms that agree: ``mode="chunk"`` (chunked parallel, the default),
``"recurrent"`` (token loop) and ``"naive"`` (the paper's recurrence written literally, in
:mod:`attnzoo.linear.naive`). Each op has a ``*_step`` twin for decoding one token with O(1) state.
Packed variable-length batches use ``cu_seqlens`` (B = 1; one state per sequence); on the Triton kernels (and
on CUDA generally) sequences of similar length run as one zero-padded batch (`_core.length_buckets`: the
grouping that minimises padded tokens plus a cost per group), not one launch of every kernel per sequence. This
is the pure-PyTorch tier: differentiable by autograd, any float dtype (float32 compute for half precision).
"""
from .delta_rule import delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step, kda, kda_step
from .feature_maps import FEATURE_MAPS, HedgehogFeatureMap
from .gla import gla, gla_step
from .linear_attention import linear_attention, linear_attention_step


def simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """Scalar-gated linear attention on the Triton kernels (needs triton; CUDA or TRITON_INTERPRET=1):
    S_t = exp(g_t) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t, g (B, H, T) in log space or None."""
    from .triton_kernels import simple_gla as _f

    return _f(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def simple_gla_step(q_t, k_t, v_t, g_t=None, state=None, scale=None, inplace=False):
    """One decoding token of `simple_gla` on the Triton step kernel -> (o_t, new_state)."""
    from .triton_kernels import simple_gla_step as _f

    return _f(q_t, k_t, v_t, g_t, state=state, scale=scale, inplace=inplace)

__all__ = [
    "linear_attention", "linear_attention_step", "gla", "gla_step", "delta_rule", "delta_rule_step",
    "gated_delta_rule", "gated_delta_rule_step", "kda", "kda_step", "HedgehogFeatureMap", "FEATURE_MAPS",
    "simple_gla", "simple_gla_step",
]
