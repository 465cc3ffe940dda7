"""The public API: argument validation (clear errors naming the argument), dispatch and explain()."""
import pytest
import torch

import attnzoo as az


def qkv(b=1, hq=4, hkv=2, lq=16, lk=16, d=8, dv=8, dtype=torch.float32):
    return torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype), torch.randn(b, hkv, lk, dv, dtype=dtype)


def test_default_call_and_shapes():
    q, k, v = qkv(dv=12)
    out = az.attention(q, k, v)
    assert out.shape == (1, 4, 16, 12) and out.dtype == torch.float32
    out, lse = az.attention(q, k, v, az.SlidingWindow(3) | az.Sinks(2), return_lse=True)
    assert lse.shape == (1, 4, 16) and lse.dtype == torch.float32


@pytest.mark.parametrize("bad, exc, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[..., None], v), ValueError, "k must have 4 dimensions"),
    (lambda q, k, v: (q, k, v.tolist()), TypeError, "v must be a torch.Tensor"),
    (lambda q, k, v: (q.repeat(2, 1, 1, 1), k, v), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q[..., :4], k, v), ValueError, "same head_dim"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of key/value heads"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "same number of heads"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "same length"),
    (lambda q, k, v: (q.double(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q must be float16"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "empty input: q length"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "empty input: k/v length"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
])
def test_bad_tensors(bad, exc, match):
    q, k, v = bad(*qkv())
    with pytest.raises(exc, match=match):
        az.attention(q, k, v)


def test_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="pattern must be"):
        az.attention(q, k, v, pattern="causal")
    with pytest.raises(TypeError, match="scale must be"):
        az.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite"):
        az.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        az.attention(q, k, v, return_lse=1)
    with pytest.raises(ValueError, match="unknown backend 'flash9'"):
        az.attention(q, k, v, backend="flash9")
    with pytest.raises(TypeError, match="backend must be a string"):
        az.attention(q, k, v, backend=None)


def test_backend_that_cannot_run_says_why():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sdpa.*only runs full and causal"):
        az.attention(q, k, v, az.SlidingWindow(4), backend="sdpa")
    with pytest.raises(ValueError, match="does not return the log-sum-exp"):
        az.attention(q, k, v, az.Causal(), backend="sdpa", return_lse=True)


def test_pattern_errors_surface_through_attention():
    q, k, v = qkv(lq=16, lk=16)
    with pytest.raises(ValueError, match="grid .* has 20 tokens but the sequence has 16"):
        az.attention(q, k, v, az.Neighborhood((3, 3), grid=(4, 5)))
    with pytest.raises(ValueError, match="exceeds the grid extent"):
        az.attention(q, k, v, az.Neighborhood(17))
    with pytest.raises(ValueError, match="PerHead has 2 patterns but the query has 4 heads"):
        az.attention(q, k, v, az.PerHead([az.Causal(), az.Full()]))
    with pytest.raises(ValueError, match="Document lengths sum to 10"):
        az.attention(q, k, v, az.Document([4, 6]))
    q2, k2, v2 = qkv(lq=8, lk=16)
    with pytest.raises(ValueError, match="self-attention"):
        az.attention(q2, k2, v2, az.Neighborhood(3))
    for ctor, exc in [(lambda: az.SlidingWindow(-1), ValueError), (lambda: az.Neighborhood(3, dilation=0), ValueError),
                      (lambda: az.Neighborhood(3, stride=4), ValueError), (lambda: az.Neighborhood(5, grid=(4,)), ValueError),
                      (lambda: az.Document([]), ValueError), (lambda: az.SlidingWindow(2.5), TypeError)]:
        with pytest.raises(exc):
            ctor()


def test_explain_on_cpu():
    q, k, v = qkv()
    ex = az.explain(q, k, v, az.Causal())
    assert ex.backend == "sdpa"
    ex = az.explain(q, k, v, az.SlidingWindow(4) | az.Sinks(1))
    assert ex.backend == "reference"
    assert not ex.reasons["sdpa"][0] and "full and causal" in ex.reasons["sdpa"][1]
    assert not ex.reasons["flex"][0] and "eager" in ex.reasons["flex"][1]
    text = str(ex)
    assert "auto picks: reference" in text and "declined" in text
    ex = az.explain(q, k, v, az.Causal(), return_lse=True)
    assert ex.backend == "reference" and "log-sum-exp" in ex.reasons["sdpa"][1]


def test_auto_result_matches_reference_and_bad_input_leaves_tensors_untouched():
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    out = az.attention(q, k, v, az.Causal())
    ref = az.attention(q, k, v, az.Causal(), backend="reference")
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError):
        az.attention(q, k, v, az.Document([3]))
    for a, b in zip((q, k, v), copies):
        assert torch.equal(a, b)
