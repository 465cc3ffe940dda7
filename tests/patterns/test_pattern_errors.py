"""Bad input raises the documented error; patterns are hashable, comparable, immutable and printable."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.patterns import (Causal, Chunked, Dilated, Document, Full, Intersection, Mask, Neighborhood,
                              Pattern, PerHead, PowerAttention, PrefixLM, Sinks, SlidingWindow, Strided, Union)
from pattern_strategies import composite_patterns, mod3, neighborhoods


# -- constructor arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: SlidingWindow(-1),
    lambda: SlidingWindow(3, -1),
    lambda: SlidingWindow(-5, 2),
    lambda: Sinks(0),
    lambda: Sinks(-3),
    lambda: Chunked(0),
    lambda: Dilated(0, 1),
    lambda: Dilated(3, 0),
    lambda: Strided(0),
    lambda: PrefixLM(-1),
    lambda: PowerAttention(-1),
    lambda: PowerAttention(4, sinks=-1),
    lambda: Document([]),
    lambda: Document(()),
    lambda: Document([3, 0, 2]),
    lambda: Document([3, -1]),
    lambda: Neighborhood(0),
    lambda: Neighborhood(5, grid=4),                   # kernel larger than the grid
    lambda: Neighborhood(3, dilation=2, grid=5),       # kernel * dilation = 6 > 5
    lambda: Neighborhood((3, 5), grid=(8, 4)),         # second axis too small
    lambda: Neighborhood(3, stride=4),                 # stride > kernel
    lambda: Neighborhood((3, 3), stride=(1, 4), grid=(8, 8)),
    lambda: Neighborhood(3, grid=(2, 2, 2, 2)),        # 4 axes
    lambda: Neighborhood(1, grid=()),                  # 0 axes
    lambda: Neighborhood((3, 3)),                      # multi-axis kernel without grid
    lambda: Neighborhood((3, 3, 3), grid=(8, 8)),      # per-axis tuple of the wrong length
    lambda: Neighborhood(3, dilation=(1, 2)),
    lambda: Neighborhood(3, grid=(4, 0)),
    lambda: PerHead([]),
    lambda: PerHead([PerHead([Causal()])]),            # nested per-head
], ids=lambda f: None)
def test_value_errors(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make", [
    lambda: SlidingWindow(3.0),
    lambda: SlidingWindow("3"),
    lambda: SlidingWindow(True),
    lambda: SlidingWindow(3, 1.5),
    lambda: SlidingWindow(None),
    lambda: Sinks(4.0),
    lambda: Chunked("8"),
    lambda: Dilated(3.0, 2),
    lambda: Dilated(3, 2.0),
    lambda: Strided(2.5),
    lambda: PrefixLM(1.0),
    lambda: PowerAttention(4, sinks=1.0),
    lambda: Document(5),
    lambda: Document([1.0, 2]),
    lambda: Document(["a"]),
    lambda: Neighborhood(3.0),
    lambda: Neighborhood(3, dilation=1.0),
    lambda: Neighborhood(3, causal=1),
    lambda: Neighborhood(3, grid=8.0),
    lambda: PerHead([3]),
    lambda: PerHead([Causal(), "full"]),
    lambda: Mask(3),
], ids=lambda f: None)
def test_type_errors(make):
    with pytest.raises(TypeError):
        make()


@pytest.mark.parametrize("other", [3, "x", None, 1.5, torch.ones(2, dtype=torch.bool)])
def test_combine_with_non_pattern(other):
    with pytest.raises(TypeError):
        Causal() | other
    with pytest.raises(TypeError):
        Causal() & other
    if not isinstance(other, torch.Tensor):   # a tensor's own __or__ gets the first go
        with pytest.raises(TypeError):
            other | Causal()
        with pytest.raises(TypeError):
            other & Causal()


# -- errors at block_layout / density time ------------------------------------------------------------
def both(pattern, q_len, kv_len, **kw):
    """The calls that must validate: block_layout and density."""
    return [lambda: pattern.block_layout(q_len, kv_len, 4, 4, **kw), lambda: pattern.density(q_len, kv_len, **kw)]


@pytest.mark.parametrize("call", range(2))
def test_document_sum_mismatch(call):
    for kv_len in (6, 8):
        with pytest.raises(ValueError, match="sum"):
            both(Document([3, 4]), 7, kv_len)[call]()
    # inside a composite too
    with pytest.raises(ValueError, match="sum"):
        both(Causal() & Document([3, 4]), 8, 8)[call]()
    both(Document([3, 4]), 7, 7)[call]()   # a matching sum is fine


@pytest.mark.parametrize("call", range(2))
def test_neighborhood_grid_errors(call):
    with pytest.raises(ValueError):
        both(Neighborhood(3, grid=(4, 4)), 17, 17)[call]()          # grid product != sequence length
    with pytest.raises(ValueError):
        both(Neighborhood((3, 3), grid=(4, 4)), 15, 15)[call]()
    with pytest.raises(ValueError):
        both(Neighborhood(3, grid=(4, 4)), 16, 17)[call]()          # q_len != kv_len
    with pytest.raises(ValueError):
        both(Neighborhood(3), 8, 9)[call]()
    with pytest.raises(ValueError):
        both(Neighborhood(3), 9, 8)[call]()
    with pytest.raises(ValueError):
        both(Neighborhood(9), 8, 8)[call]()                         # grid=None: kernel > sequence
    with pytest.raises(ValueError):
        both(Neighborhood(3, dilation=3), 8, 8)[call]()             # grid=None: kernel * dilation > sequence
    with pytest.raises(ValueError):
        both(Neighborhood(3) | Causal(), 8, 9)[call]()
    both(Neighborhood(3, grid=(4, 4)), 16, 16)[call]()              # consistent: fine


@pytest.mark.parametrize("call", range(2))
def test_perhead_wrong_num_heads(call):
    ph = PerHead([Causal(), Full(), SlidingWindow(2)])
    for h in (1, 2, 4):
        with pytest.raises(ValueError):
            both(ph, 8, 8, num_heads=h)[call]()
        with pytest.raises(ValueError):
            both(ph | Sinks(2), 8, 8, num_heads=h)[call]()
    both(ph, 8, 8, num_heads=3)[call]()


@pytest.mark.parametrize("call", range(2))
def test_per_head_mask_needs_num_heads(call):
    with pytest.raises(ValueError):
        both(Mask(mod3, per_head=True), 8, 8)[call]()
    with pytest.raises(ValueError):
        both(Mask(mod3, per_head=True) & Causal(), 8, 8)[call]()


@pytest.mark.parametrize("call", range(2))
def test_mismatched_perheads_in_a_composite(call):
    """Per-head operands with different head counts are rejected with ValueError, not a broadcasting error
    (regression: check() once validated each operand against num_heads=None only)."""
    two, three = PerHead([Causal(), Full()]), PerHead([Causal(), Full(), Sinks(2)])
    for pat in (two | three, three & two, (two | Causal()) & three, two | (Sinks(1) & three)):
        with pytest.raises(ValueError):
            both(pat, 8, 8)[call]()
        for h in (2, 3):
            with pytest.raises(ValueError):
                both(pat, 8, 8, num_heads=h)[call]()
    with pytest.raises(ValueError):
        both(two | Mask(mod3, per_head=True), 8, 8, num_heads=3)[call]()
    both(two | Mask(mod3, per_head=True), 8, 8, num_heads=2)[call]()   # consistent: fine
    both(two & PerHead([Sinks(1), Full()]), 8, 8)[call]()


def test_head_dependent_mask_needs_head():
    for pat in (PerHead([Causal(), Full()]), Mask(mod3, per_head=True), Causal() | PerHead([Full()])):
        with pytest.raises(ValueError):
            pat.mask(torch.arange(4)[:, None], torch.arange(4)[None, :], 4, 4)


@pytest.mark.parametrize("bad", [
    dict(q_len=0), dict(kv_len=0), dict(block_q=0), dict(block_k=-1), dict(q_len=8.0), dict(block_k=True),
])
def test_bad_lengths(bad):
    args = dict(q_len=8, kv_len=8, block_q=4, block_k=4)
    args.update(bad)
    exc = TypeError if any(not isinstance(v, int) or isinstance(v, bool) for v in bad.values()) else ValueError
    with pytest.raises(exc):
        Causal().block_layout(**args)
    if "q_len" in bad or "kv_len" in bad:
        with pytest.raises(exc):
            Causal().density(args["q_len"], args["kv_len"])


# -- hashable, equal by value, immutable, printable -------------------------------------------------
def equal_pairs():
    return [
        (Full(), Full()), (Causal(), Causal()),
        (SlidingWindow(1023), SlidingWindow(1023, 0)), (SlidingWindow(3, 2), SlidingWindow(left=3, right=2)),
        (Sinks(4), Sinks(4)), (Chunked(8), Chunked(8)), (Dilated(4, 2), Dilated(4, 2)), (Dilated(4), Dilated(4, 1)),
        (Strided(4), Strided(4)), (PrefixLM(3), PrefixLM(3)), (PowerAttention(3), PowerAttention(3, 0)),
        (PowerAttention(3, sinks=2), PowerAttention(3, 2)),
        (Document([1, 2, 3]), Document((1, 2, 3))), (Document([1, 2, 3]), Document(torch.tensor([1, 2, 3]))),
        (Neighborhood(3), Neighborhood((3,), dilation=(1,), stride=1, causal=(False,))),
        (Neighborhood(3, grid=8), Neighborhood(3, grid=(8,))),
        (Neighborhood(3, grid=(4, 4)), Neighborhood((3, 3), dilation=(1, 1), grid=[4, 4])),
        (Mask(mod3), Mask(mod3)), (Mask(mod3, per_head=True), Mask(mod3, True)),
        (SlidingWindow(7) | Sinks(4), Union(SlidingWindow(7), Sinks(4))),
        (Causal() & Chunked(4), Intersection(Causal(), Chunked(4))),
        (PerHead([Causal(), Full()]), PerHead((Causal(), Full()))),
    ]


@pytest.mark.parametrize("a, b", equal_pairs(), ids=lambda p: repr(p))
def test_equal_and_hash(a, b):
    assert a == b and not (a != b)
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1


@pytest.mark.parametrize("a, b", [
    (SlidingWindow(3), SlidingWindow(4)), (SlidingWindow(3), SlidingWindow(3, 1)), (Sinks(4), Sinks(5)),
    (Chunked(8), Chunked(4)), (Dilated(4, 2), Dilated(4, 3)), (Strided(4), Strided(5)), (PrefixLM(3), PrefixLM(4)),
    (PowerAttention(3), PowerAttention(3, 1)), (Document([1, 2]), Document([2, 1])),
    (Neighborhood(3), Neighborhood(3, causal=True)), (Neighborhood(3), Neighborhood(3, grid=8)),
    (Neighborhood(3, grid=(4, 4)), Neighborhood(3, grid=(4, 4), stride=(1, 2))),
    (Mask(mod3), Mask(mod3, per_head=True)), (Causal(), Full()), (Causal(), PrefixLM(0)), (Chunked(4), Strided(4)),
    (SlidingWindow(7) | Sinks(4), Sinks(4) | SlidingWindow(7)), (Causal() | Full(), Causal() & Full()),
    (PerHead([Causal(), Full()]), PerHead([Full(), Causal()])),
], ids=lambda p: repr(p))
def test_not_equal(a, b):
    assert a != b and not (a == b)
    assert len({a, b}) == 2


@pytest.mark.parametrize("pattern, field", [
    (SlidingWindow(3), "left"), (SlidingWindow(3), "right"), (Sinks(4), "n"), (Chunked(8), "size"),
    (Dilated(4, 2), "dilation"), (Strided(4), "stride"), (PrefixLM(3), "prefix_len"),
    (PowerAttention(3), "window"), (Document([1, 2]), "lengths"), (Neighborhood(3), "kernel_size"),
    (Neighborhood(3), "grid"), (Mask(mod3), "fn"), (SlidingWindow(3) | Sinks(4), "a"),
    (Causal() & Full(), "b"), (PerHead([Causal()]), "patterns"),
])
def test_immutable(pattern, field):
    before = repr(pattern)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(pattern, field, getattr(pattern, field))
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(pattern, field)
    assert repr(pattern) == before
    # sequence fields are stored as tuples, so they cannot be mutated in place either
    if field in ("lengths", "kernel_size", "patterns"):
        assert isinstance(getattr(pattern, field), tuple)


def test_document_copies_its_input():
    lengths = [1, 2, 3]
    doc = Document(lengths)
    lengths.append(4)
    assert doc.lengths == (1, 2, 3)


@pytest.mark.parametrize("pattern, text", [
    (Full(), "Full()"), (Causal(), "Causal()"),
    (SlidingWindow(1023), "SlidingWindow(1023)"), (SlidingWindow(3, 2), "SlidingWindow(3, 2)"),
    (Sinks(4), "Sinks(4)"), (Chunked(8), "Chunked(8)"), (Dilated(4, 2), "Dilated(4, 2)"),
    (Strided(4), "Strided(4)"), (PrefixLM(3), "PrefixLM(3)"),
    (PowerAttention(3), "PowerAttention(3)"), (PowerAttention(3, sinks=2), "PowerAttention(3, sinks=2)"),
    (Document([3, 4]), "Document([3, 4])"),
    (Document([1] * 10), "Document([1, 1, 1, ... 10 docs, 10 tokens])"),
    (Mask(mod3), "Mask(mod3)"), (Mask(mod3, per_head=True), "Mask(mod3, per_head=True)"),
    (Neighborhood(7), "Neighborhood(kernel_size=7)"),
    (Neighborhood(3, stride=2, causal=True), "Neighborhood(kernel_size=3, stride=2, causal=True)"),
    (Neighborhood((3, 5), dilation=(1, 2), causal=(True, False), grid=(8, 12)),
     "Neighborhood(kernel_size=(3, 5), dilation=(1, 2), causal=(True, False), grid=(8, 12))"),
    (SlidingWindow(1023) | Sinks(4), "(SlidingWindow(1023) | Sinks(4))"),
    (Document([3, 4]) & Causal(), "(Document([3, 4]) & Causal())"),
    ((Causal() | Sinks(2)) & Chunked(4), "((Causal() | Sinks(2)) & Chunked(4))"),
    (PerHead([Causal(), SlidingWindow(8)]), "PerHead([Causal(), SlidingWindow(8)])"),
])
def test_repr(pattern, text):
    assert repr(pattern) == text
    assert str(pattern) == text


_NS = {name: getattr(attnzoo, name) for name in attnzoo.__all__}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 48).flatmap(lambda n: composite_patterns(n)))
def test_repr_round_trips(pattern):
    """Readable means: for patterns without callables, eval(repr(p)) rebuilds an equal pattern."""
    text = repr(pattern)
    if "Mask(" in text or "..." in text:
        return
    again = eval(text, dict(_NS))
    assert again == pattern and hash(again) == hash(pattern)


@settings(max_examples=30, deadline=None)
@given(neighborhoods())
def test_neighborhood_repr_round_trips(nb_n):
    nb, _ = nb_n
    assert eval(repr(nb), dict(_NS)) == nb


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 48).flatmap(lambda n: composite_patterns(n)))
def test_patterns_are_hashable_values(pattern):
    assert isinstance(pattern, Pattern)
    assert dataclasses.is_dataclass(pattern)
    copy = dataclasses.replace(pattern)        # a fresh object with the same field values
    assert copy is not pattern
    assert copy == pattern and hash(copy) == hash(pattern) and copy in {pattern}
