"""Bad arguments raise ValueError / TypeError naming the argument, before any computation."""
import pytest
import torch

import attnzoo.linear as lin

B, H, T, K, V = 2, 2, 9, 4, 3


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _good(op):
    q, k, v = _t(B, H, T, K), _t(B, H, T, K), _t(B, H, T, V)
    return {
        "linear_attention": dict(q=q, k=k, v=v),
        "gla": dict(q=q, k=k, v=v, g=-_t(B, H, T, K).abs()),
        "delta_rule": dict(q=q, k=k, v=v, beta=_t(B, H, T).sigmoid()),
        "gated_delta_rule": dict(q=q, k=k, v=v, g=-_t(B, H, T).abs(), beta=_t(B, H, T).sigmoid()),
        "kda": dict(q=q, k=k, v=v, g=-_t(B, H, T, K).abs(), beta=_t(B, H, T).sigmoid()),
    }[op]


OPS = ["linear_attention", "gla", "delta_rule", "gated_delta_rule", "kda"]

COMMON = [  # (override, error, message fragment)
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.ones(B, H, T, K, dtype=torch.int64)), TypeError, "q must be a floating"),
    (dict(q=_t(H, T, K)), ValueError, "q must have 4 dimensions"),
    (dict(k=_t(B, H, T, K + 1)), ValueError, "k must have the shape of q"),
    (dict(v=_t(B, H, T + 1, V)), ValueError, "v must match q"),
    (dict(v=_t(B, H, T, V, dtype=torch.float64)), TypeError, "q, k, v must share one dtype"),
    (dict(k=torch.empty(B, H, T, K, device="meta")), ValueError, "k is on meta"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(scale="big"), TypeError, "scale must be a real number"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(output_final_state=1), TypeError, "output_final_state must be a bool"),
    (dict(initial_state=_t(B, H, K, V + 2)), ValueError, "initial_state must have shape"),
    (dict(initial_state=_t(B, H, K)), ValueError, "initial_state must have 4 dimensions"),
    (dict(cu_seqlens=torch.tensor([0.0, 9.0])), TypeError, "cu_seqlens must have an integer dtype"),
    (dict(cu_seqlens=[0, 9]), TypeError, "cu_seqlens must be an integer torch.Tensor"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "batch must be 1"),
]

PACKED = [  # with B = 1
    (dict(cu_seqlens=torch.tensor([0, 4, 8])), ValueError, "end at the packed length 9"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 9])), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([[0, 9]])), ValueError, "cu_seqlens must be 1-D"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9]), initial_state=_t(1, H, K, V)), ValueError,
     "initial_state must have shape"),
]

GATES = {
    "gla": [(dict(g=_t(B, H, T)), ValueError, "g must have 4 dimensions"),
            (dict(g=_t(B, H, T, K + 1)), ValueError, "g must have shape"),
            (dict(g=torch.zeros(B, H, T, K, dtype=torch.int32)), TypeError, "g must be a floating")],
    "delta_rule": [(dict(beta=_t(B, H, T, 1)), ValueError, "beta must have 3 dimensions"),
                   (dict(beta=_t(B, H, T + 1)), ValueError, "beta must have shape")],
    "gated_delta_rule": [(dict(g=_t(B, H, T, K)), ValueError, "g must have 3 dimensions"),
                         (dict(beta="x"), TypeError, "beta must be a torch.Tensor")],
    "kda": [(dict(g=_t(B, H, T)), ValueError, "g must have 4 dimensions"),
            (dict(beta=_t(B, H, T - 1)), ValueError, "beta must have shape")],
    "linear_attention": [
        (dict(feature_map="softmax"), ValueError, "feature_map must be one of"),
        (dict(feature_map=3), TypeError, "feature_map must be a name"),
        (dict(feature_map=lambda x: x[..., 0]), ValueError, r"feature_map\(q\) must return"),
        (dict(feature_map=lambda x: x.long()), TypeError, r"feature_map\(q\) must return a floating"),
        (dict(decay=0.5), ValueError, "decay is log gamma"),
        (dict(decay="slow"), TypeError, "decay must be None"),
        (dict(decay=torch.zeros(H + 1)), ValueError, "decay must be a float or a tensor of shape"),
        (dict(decay=torch.zeros(H, dtype=torch.int64)), TypeError, "decay must be a floating"),
        (dict(decay=-0.1, causal=False), ValueError, "decay needs causal=True"),
        (dict(normalize=1), TypeError, "normalize must be a bool"),
        (dict(causal="no"), TypeError, "causal must be a bool"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(normalize=True, initial_state=_t(B, H, K, V)), ValueError, "initial_state must have shape"),
        (dict(feature_map="taylor", initial_state=_t(B, H, K, V)), ValueError, "initial_state must have shape"),
    ],
}


def _call(op, kwargs):
    return getattr(lin, op)(**kwargs)


@pytest.mark.parametrize("op", OPS)
def test_errors_name_the_argument(op):
    cases = COMMON + GATES[op]
    for override, err, msg in cases:
        with pytest.raises(err, match=msg):
            _call(op, {**_good(op), **override})
    good = {key: x[:1] for key, x in _good(op).items()}
    for override, err, msg in PACKED:
        with pytest.raises(err, match=msg):
            _call(op, {**good, **override})
    _call(op, _good(op))  # and the good call runs


def test_step_errors():
    q, k, v = _t(B, H, K), _t(B, H, K), _t(B, H, V)
    s = _t(B, H, K, V)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        lin.gla_step(q[None], k, v, q, s)
    with pytest.raises(ValueError, match="g_t must have shape"):
        lin.gla_step(q, k, v, _t(B, H, K + 1), s)
    with pytest.raises(ValueError, match="state must have shape"):
        lin.gla_step(q, k, v, -q.abs(), _t(B, H, K, V + 1))
    with pytest.raises(ValueError, match="beta_t must have 2 dimensions"):
        lin.delta_rule_step(q, k, v, _t(B, H, 1), s)
    with pytest.raises(ValueError, match="g_t must have 2 dimensions"):
        lin.gated_delta_rule_step(q, k, v, _t(B, H, K), _t(B, H), s)
    with pytest.raises(ValueError, match="g_t must have 3 dimensions"):
        lin.kda_step(q, k, v, _t(B, H), _t(B, H), s)
    with pytest.raises(ValueError, match="state must have shape"):
        lin.linear_attention_step(q, k, v, s, normalize=True)
    with pytest.raises(ValueError, match="decay is log gamma"):
        lin.linear_attention_step(q, k, v, s, decay=1.0)
    with pytest.raises(TypeError, match="scale must be"):
        lin.kda_step(q, k, v, -q.abs(), _t(B, H), s, scale="x")
