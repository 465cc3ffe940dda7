"""The fused layout kernel of banded patterns (`backends/triton/band_layout.py`, Triton's CPU interpreter)
against `Pattern.block_layout` (the PyTorch closed form, itself checked against the mask): the same partial
and full lists, forward and transposed, for every band leaf and composites whose unsure blocks settle to
partial, to full (a union) and to empty (an intersection), per-head patterns, cross attention both ways,
ragged lengths and block sizes that are not powers of two."""
import pytest
import torch

import attnzoo as az

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops  # noqa: E402
from attnzoo.backends.triton.band_layout import band_layout, supported  # noqa: E402

if not ops.interpreting() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lists(lay):
    """(counts, each line's valid entries in order): what a kernel reads."""
    out = []
    for num, idx in ((lay.kv_num_blocks, lay.kv_indices), (lay.full_kv_num_blocks, lay.full_kv_indices)):
        num, idx = num.cpu(), idx.cpu()
        rows = [[idx[0, h, i, :int(num[0, h, i])].tolist() for i in range(num.shape[2])]
                for h in range(num.shape[1])]
        out.append((num.tolist(), rows))
    return out


def _transpose(lay):
    part, full = lay.partial_blocks(), lay.full_blocks()
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    return az.patterns.BlockLayout.from_bool(t(part | full), t(full), block_q=lay.block_k, block_k=lay.block_q,
                                             q_len=lay.kv_len, kv_len=lay.q_len)


PATTERNS = {
    "full": az.Full(),
    "causal": az.Causal(),
    "window": az.SlidingWindow(9),
    "window-2sided": az.SlidingWindow(9, 4),
    "sinks": az.Sinks(5),
    "chunked": az.Chunked(11),
    "prefix": az.PrefixLM(13),
    "sinks|window": az.SlidingWindow(6) | az.Sinks(3),
    "chunked&causal": az.Chunked(11) & az.Causal(),
    "union-settles-full": az.Causal() | az.SlidingWindow(0, 10**6),
    "intersection-settles-empty": az.Sinks(2) & az.SlidingWindow(5),
    "nested": (az.SlidingWindow(4) | az.Sinks(2)) & (az.Chunked(16) | az.PrefixLM(3)),
    "perhead": az.PerHead([az.Causal(), az.SlidingWindow(4) | az.Sinks(1), az.Full(), az.Chunked(7)]),
}
# (Lq, Lk, block_q, block_k)
SHAPES = [(48, 48, 8, 8), (33, 48, 16, 8), (48, 30, 8, 16), (50, 50, 5, 7), (64, 64, 16, 16), (1, 40, 8, 8)]


def _doc_shapes(lk):
    return az.Document([7, 20, lk - 27])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(PATTERNS) + ["document", "document&causal"])
def test_same_lists_as_block_layout(name, shape):
    lq, lk, bm, bn = shape
    if name.startswith("document"):
        p = _doc_shapes(lk) if name == "document" else _doc_shapes(lk) & az.Causal()
    else:
        p = PATTERNS[name]
    heads = 4 if p.head_dependent else None
    assert supported(p) == (True, "")
    ref = p.block_layout(lq, lk, bm, bn, num_heads=heads)
    got = band_layout(p, lq, lk, bm, bn, DEV, num_heads=heads)
    assert (got.block_q, got.block_k, got.q_len, got.kv_len) == (bm, bn, lq, lk)
    assert got.kv_indices.shape == ref.kv_indices.shape
    assert _lists(got) == _lists(ref)
    tgot = band_layout(p, lq, lk, bm, bn, DEV, num_heads=heads, transposed=True)
    assert (tgot.block_q, tgot.block_k, tgot.q_len, tgot.kv_len) == (bn, bm, lk, lq)
    assert _lists(tgot) == _lists(_transpose(ref))


def test_composites_exercise_every_settled_class():
    """The three special composites do produce unsure blocks that settle to 2 (full), 0 (none) and 1."""
    lq = lk = 48
    full = PATTERNS["union-settles-full"].block_layout(lq, lk, 8, 8)
    assert int(full.kv_num_blocks.sum()) == 0 and int(full.full_kv_num_blocks.sum()) == 36
    empty = PATTERNS["intersection-settles-empty"].block_layout(lq, lk, 8, 8)
    # block (1, 0) is partial for both operands but no pair is visible: not visited
    assert 0 not in empty.kv_indices[0, 0, 1, :int(empty.kv_num_blocks[0, 0, 1])].tolist()
    got = band_layout(PATTERNS["intersection-settles-empty"], lq, lk, 8, 8, DEV)
    assert _lists(got) == _lists(empty)


@pytest.mark.parametrize("p", [az.Dilated(4, 2), az.Neighborhood(5), az.SlidingWindow(4) | az.Strided(3),
                               az.Mask(lambda q, k: k <= q)])
def test_other_patterns_are_refused_with_a_reason(p):
    ok, why = supported(p)
    assert not ok and ("band" in why or "mask" in why)
    with pytest.raises(ValueError, match="band_layout"):
        band_layout(p, 32, 32, 8, 8, DEV)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_q"):
        band_layout(az.Causal(), 32, 32, 0, 8, DEV)
    with pytest.raises(ValueError, match="Document lengths sum"):
        band_layout(az.Document([10, 10]), 32, 32, 8, 8, DEV)
    with pytest.raises(ValueError, match="PerHead"):
        band_layout(az.PerHead([az.Causal(), az.Full()]), 32, 32, 8, 8, DEV, num_heads=3)


def test_backend_layouts_come_from_the_kernel():
    """The Triton backend's cached layouts for a banded pattern are the kernel's (same lists as the
    PyTorch closed form), and a non-banded one keeps the PyTorch path."""
    p = az.SlidingWindow(6) | az.Sinks(3)
    assert ops._band_kernel(p, DEV) and not ops._band_kernel(az.Dilated(4, 2), DEV)
    lay = ops._layout(p, 40, 40, 8, 8, 2, DEV)
    tlay = ops._tlayout(p, 40, 40, 8, 8, 2, DEV)
    ref = p.block_layout(40, 40, 8, 8)
    assert _lists(lay) == _lists(ref) and _lists(tlay) == _lists(_transpose(ref))
