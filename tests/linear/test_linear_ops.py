"""GLA, DeltaNet, Gated DeltaNet and KDA: the chunked and recurrent forms against the naive recurrence
(outputs, final state and every gradient), float32 against float64, packed sequences, decoding."""
import functools

import pytest
import torch
import torch.nn.functional as F

import attnzoo.linear as lin
from attnzoo.linear import naive
from attnzoo.testing import check_close

from linear_helpers import OPS, cast, make_inputs, outputs_and_grads

NAMES = list(OPS)


@functools.lru_cache(maxsize=None)
def _reference(name, t, strong=False):
    args = make_inputs(name, t=t, strong=strong)
    fn = functools.partial(OPS[name][0], mode="naive", output_final_state=True)
    return args, outputs_and_grads(fn, args)


def _compare(tag, got, want, dtype=torch.float64):
    assert got.keys() == want.keys()
    for key in want:
        check_close(f"{tag}/{key}", got[key], want[key].to(got[key].dtype) if dtype == torch.float64 else want[key])


@pytest.mark.parametrize("t, chunk_size", [(37, 8), (37, 16), (37, 64), (37, 5), (32, 8), (32, 16)])
@pytest.mark.parametrize("name", NAMES)
def test_chunk_matches_naive_float64(name, t, chunk_size):
    args, want = _reference(name, t)
    fn = functools.partial(OPS[name][0], mode="chunk", chunk_size=chunk_size, output_final_state=True)
    _compare(f"{name}/chunk{chunk_size}/T{t}", outputs_and_grads(fn, cast(args, torch.float64)), want)


@pytest.mark.parametrize("name", NAMES)
def test_recurrent_matches_naive_float64(name):
    args, want = _reference(name, 37)
    fn = functools.partial(OPS[name][0], mode="recurrent", output_final_state=True)
    _compare(f"{name}/recurrent", outputs_and_grads(fn, cast(args, torch.float64)), want)


@pytest.mark.parametrize("name", NAMES)
def test_float32_chunk_meets_protocol_with_strong_gates(name):
    """float32 chunk vs float64 naive, gates down to about -5 per step on some channels."""
    args, want = _reference(name, 37, strong=True)
    for cs in (16, 64):
        fn = functools.partial(OPS[name][0], mode="chunk", chunk_size=cs, output_final_state=True)
        got = outputs_and_grads(fn, cast(args, torch.float32))
        assert all(x.dtype == torch.float32 for x in got.values())
        _compare(f"{name}/fp32/chunk{cs}", got, want, torch.float32)


@pytest.mark.parametrize("name", ["gla", "kda", "gated_delta_rule"])
def test_extreme_gates_stay_finite(name):
    """Gates of -30 per step (exp(-1900) over a chunk) neither overflow nor give NaN gradients."""
    args = cast(make_inputs(name, t=70, dk=8, strong=False), torch.float32)
    with torch.no_grad():
        args["g"].copy_(-30 * torch.rand_like(args["g"]))
    ref = OPS[name][0](**cast(args, torch.float64), mode="naive", output_final_state=True)
    res = outputs_and_grads(functools.partial(OPS[name][0], output_final_state=True), args)
    check_close(f"{name}/o", res["o"], ref[0])
    check_close(f"{name}/state", res["state"], ref[1])
    assert all(torch.isfinite(x).all() for x in res.values())


def test_bf16_inputs_compute_in_float32():
    args = cast(make_inputs("kda", t=20), torch.bfloat16)
    o, s = lin.kda(**args, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref = lin.kda(**cast(args, torch.float64), mode="naive")[0]
    base = lin.kda(**{k: v.detach() for k, v in args.items()}, mode="recurrent")[0]  # same fp32 math, other order
    check_close("kda/bf16", o, ref, baseline=base)


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "naive"])
@pytest.mark.parametrize("name", NAMES)
def test_packed_sequences_equal_separate_runs(name, mode):
    lens = [5, 0, 19, 13]
    cu = torch.tensor([0, 5, 5, 24, 37], dtype=torch.int32)
    args = make_inputs(name, b=1, t=37, n_state=len(lens))
    s0 = args.pop("initial_state")
    fn = OPS[name][0]
    o, s = fn(**args, initial_state=s0, cu_seqlens=cu, mode=mode, chunk_size=8, output_final_state=True)
    assert o.shape == args["v"].shape and s.shape == s0.shape
    for n in range(len(lens)):
        a, b = cu[n].item(), cu[n + 1].item()
        part = {key: x[:, :, a:b] for key, x in args.items()}
        on, sn = fn(**part, initial_state=s0[n:n + 1], mode="naive", output_final_state=True)
        check_close(f"{name}/{mode}/seq{n}/state", s[n:n + 1], sn)
        if b > a:
            check_close(f"{name}/{mode}/seq{n}/o", o[:, :, a:b], on)
    # gradients flow through the packed path too
    o.sum().backward()
    assert torch.isfinite(s0.grad).all() and torch.isfinite(args["q"].grad).all()


def test_length_buckets_greedy_waste_bound():
    from attnzoo.linear._core import length_buckets
    lens = [5, 0, 19, 13, 2, 40, 40, 39, 1, 0, 7]
    groups = length_buckets(lens, waste=1.25)
    assert sorted(n for g in groups for n in g) == list(range(len(lens)))   # each sequence once
    for g in groups:
        real = [lens[n] for n in g if lens[n]]
        assert len(real) * max(real) <= 1.25 * sum(real)                  # the waste bound (empties aside)
    assert groups[0][:3] == [5, 6, 7]                                     # longest first, alike together
    assert length_buckets([64] * 100, waste=1.25) == [list(range(100))]   # equal lengths: one batch


def _grouping_cost(lens, groups, cost):
    return sum(len(g) * max(lens[n] for n in g) for g in groups) + cost * len(groups)


@pytest.mark.parametrize("seed", range(4))
def test_length_buckets_cost_model_is_optimal(seed):
    """The default grouping minimises padded tokens + cost x groups over every split of the sorted lengths
    (checked against an O(n^2) search), keeps each sequence once, empties in the last group."""
    import random
    from attnzoo.linear._core import length_buckets
    rng = random.Random(seed)
    for _ in range(60):
        lens = [rng.choice([0, rng.randint(1, 9), rng.randint(1, 900)]) for _ in range(rng.randint(1, 25))]
        cost = rng.choice([0, 1, 7, 100, 5000, 10 ** 7])
        groups = length_buckets(lens, group_cost=cost)
        assert sorted(n for g in groups for n in g) == list(range(len(lens)))
        full = sorted((x for x in lens if x), reverse=True)
        best = [0] + [None] * len(full)          # the O(n^2) search over the sorted non-empty lengths
        for j in range(1, len(full) + 1):
            best[j] = min(best[i] + cost + (j - i) * full[i] for i in range(j))
        got = _grouping_cost(lens, [[n for n in g if lens[n]] for g in groups if any(lens[n] for n in g)], cost)
        assert got == best[-1], (lens, cost, groups)
        if any(x == 0 for x in lens) and full:
            assert all(lens[n] for g in groups[:-1] for n in g)       # empties only in the last group
    assert length_buckets([64] * 100, group_cost=0) == [list(range(100))]   # equal lengths: one batch at any cost
    assert len(length_buckets([512, 256, 64], group_cost=0)) == 3            # free groups: no padding
    assert len(length_buckets([512, 256, 64], group_cost=10 ** 6)) == 1      # dear groups: one batch
    assert length_buckets([]) == [] and length_buckets([0, 0]) == [[0, 1]]


def test_length_buckets_reject_bad_arguments():
    from attnzoo.linear._core import length_buckets
    for kw in (dict(waste=0.5), dict(waste=float("nan")), dict(group_cost=-1), dict(group_cost=1.5),
               dict(group_cost=True)):
        with pytest.raises(ValueError):
            length_buckets([3, 2], **kw)


def test_group_tokens_scale_with_the_state():
    from attnzoo.linear._core import PACK_GROUP_WORK, group_tokens
    assert group_tokens(16, 128, 128) == PACK_GROUP_WORK // (16 * 128 * 128)
    assert group_tokens(4, 64, 64) == 16 * group_tokens(16, 128, 128)   # a 16x smaller state: 16x the tokens
    assert group_tokens(10 ** 9, 10 ** 3, 10 ** 3) == 1


@pytest.mark.parametrize("work", [None, 400, 1])
def test_packed_sequences_run_as_few_padded_batches(work, monkeypatch):
    """run_sequences calls the chunked form once per length group (not once per sequence), on inputs padded
    at each sequence's end, and gives what the per-sequence loop gives: outputs, final states, gradients.
    ``work``: the cost of a group (PACK_GROUP_WORK; the default here makes one group, 1 makes one per length)."""
    from attnzoo.linear import _core
    if work is not None:
        monkeypatch.setattr(_core, "PACK_GROUP_WORK", work)
    lens = [9, 0, 30, 28, 3, 4, 4]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    gen = torch.Generator().manual_seed(3)
    h, dk, dv, t = 2, 8, 6, cu[-1]
    base = [torch.randn(1, h, t, dk, generator=gen, dtype=torch.float64), None,
            torch.randn(1, h, t, dv, generator=gen, dtype=torch.float64),
            F.logsigmoid(torch.randn(1, h, t, generator=gen, dtype=torch.float64)),
            torch.sigmoid(torch.randn(1, h, t, generator=gen, dtype=torch.float64))]
    base[1] = F.normalize(torch.randn(1, h, t, dk, generator=gen, dtype=torch.float64), dim=-1)
    s0 = torch.randn(len(lens), h, dk, dv, generator=gen, dtype=torch.float64)
    calls = []

    def fn(q, k, v, g, beta, s):
        calls.append(q.shape[0])
        return _core.chunk_gated_delta(q, k, v, g, beta, s, 8)

    res = {}
    for batched in (True, False):
        calls.clear()
        leaves = [x.clone().requires_grad_() for x in base + [s0]]
        o, s = _core.run_sequences(fn, leaves[:5], leaves[5], cu, batched=batched)
        (o.square().sum() + (s * s.detach().cos()).sum()).backward()
        res[batched] = [o, s] + [x.grad for x in leaves]
        assert o.shape == (1, h, t, dv) and s.shape == (len(lens), h, dk, dv)
        want = _core.length_buckets(lens, group_cost=_core.group_tokens(h, dk, dv))
        assert len(calls) == (len(want) if batched else len(lens))
    assert len(want) < len(lens)
    assert len(want) == {None: 1, 400: 3, 1: 5}[work]
    for i, (a, b) in enumerate(zip(res[True], res[False])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"entry {i}")



@pytest.mark.parametrize("name", NAMES)
def test_decoding_token_by_token_equals_parallel(name):
    """Prefill 20 tokens with the chunked form, then decode 17 with the step function."""
    args = {key: x.detach() for key, x in make_inputs(name, t=37).items()}
    op, step, gate, has_beta = OPS[name]
    full_o, full_s = op(**args, chunk_size=16, output_final_state=True)
    pre = {key: (x if key == "initial_state" else x[:, :, :20]) for key, x in args.items()}
    o, s = op(**pre, chunk_size=16, output_final_state=True)
    outs = [o]
    for t in range(20, 37):
        tok = [args["q"][:, :, t], args["k"][:, :, t], args["v"][:, :, t]]
        if gate:
            tok.append(args["g"][:, :, t])
        if has_beta:
            tok.append(args["beta"][:, :, t])
        ot, s = step(*tok, s)
        assert ot.shape == args["v"][:, :, t].shape
        outs.append(ot.unsqueeze(2))
    check_close(f"{name}/decode/o", torch.cat(outs, 2), full_o)
    check_close(f"{name}/decode/state", s, full_s)


@pytest.mark.parametrize("name", NAMES)
def test_no_state_means_zero_state_and_scale(name):
    args = {key: x.detach() for key, x in make_inputs(name, t=11).items()}
    s0 = args.pop("initial_state")
    op = OPS[name][0]
    a, sa = op(**args, output_final_state=True)
    b, sb = op(**args, initial_state=torch.zeros_like(s0), output_final_state=True)
    assert op(**args)[1] is None
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa, sb)
    # scale multiplies q
    c = op(**args, scale=0.7)[0]
    d = op(**{**args, "q": args["q"] * 0.7}, scale=1.0)[0]
    torch.testing.assert_close(c, d)
    e = op(**{**args, "q": args["q"] * args["q"].shape[-1] ** -0.5}, scale=1.0)[0]
    torch.testing.assert_close(a, e)


def test_chunk_gradcheck_kda():
    args = make_inputs("kda", b=1, h=1, t=7, dk=3, dv=2)
    keys = list(args)

    def fn(*xs):
        o, s = lin.kda(**dict(zip(keys, xs)), chunk_size=3, output_final_state=True)
        return o, s

    assert torch.autograd.gradcheck(fn, tuple(args.values()))


# -------- the references against closed forms ------------------------------------------------------------

def test_naive_gla_matches_closed_form():
    args = {k: x.detach() for k, x in make_inputs("gla", t=13, state=False).items()}
    q, k, v, g = args["q"], args["k"], args["v"], args["g"]
    o = naive.naive_gla(q, k, v, g)[0]
    cg = g.cumsum(2)
    # o_t = sum_{s <= t} sum_d q_td k_sd exp(G_t - G_s)_d v_s
    w = torch.einsum("bhtd,bhsd,bhtsd->bhts", q, k, (cg[:, :, :, None] - cg[:, :, None]).exp())
    w = w * torch.ones(13, 13, dtype=torch.float64).tril()
    torch.testing.assert_close(o, w @ v, rtol=1e-12, atol=1e-12)


def test_naive_delta_rule_overwrites_memory():
    """beta = 1 with a unit key: writing (k, v1) then (k, v2) leaves S^T k = v2 exactly."""
    k = F.normalize(torch.randn(1, 1, 1, 5, dtype=torch.float64), dim=-1).expand(1, 1, 2, 5)
    v = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    _, s = naive.naive_delta_rule(k, k, v, torch.ones(1, 1, 2, dtype=torch.float64))
    torch.testing.assert_close((k[:, :, 0].unsqueeze(-2) @ s).squeeze(-2), v[:, :, 1])
    for mode in ("chunk", "recurrent"):
        _, s2 = lin.delta_rule(k, k, v, torch.ones(1, 1, 2, dtype=torch.float64), mode=mode, output_final_state=True)
        torch.testing.assert_close(s2, s)


def test_gated_delta_rule_is_kda_with_a_shared_gate():
    args = {k: x.detach() for k, x in make_inputs("gated_delta_rule", t=21).items()}
    a = lin.gated_delta_rule(**args, output_final_state=True)
    b = lin.kda(**{**args, "g": args["g"].unsqueeze(-1).expand_as(args["q"])}, output_final_state=True)
    torch.testing.assert_close(a, b)


def test_packed_gather_backward_is_the_adjoint_gather():
    """`_core._gather` (index_select forward, the inverse index_select backward, zero rows for padding) against
    autograd's own gradient of the same gather, both directions (into padded groups and back)."""
    from attnzoo.linear import _core
    gen = torch.Generator().manual_seed(0)
    # 5 packed rows into 7 padded positions (two read the zero row 5), and each row's position
    idx = torch.tensor([3, 0, 5, 4, 1, 2, 5])
    src = torch.tensor([1, 4, 5, 0, 3])
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _core._gather(t, idx, src, 1, pad_fwd=True), (x,))
    ref = torch.cat([x, x.new_zeros(2, 1, 3)], 1).index_select(1, idx)
    torch.testing.assert_close(_core._gather(x, idx, src, 1, pad_fwd=True), ref, rtol=0, atol=0)
    y = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _core._gather(t, src, idx, 1, pad_bwd=True), (y,))
    perm = torch.tensor([2, 0, 1])
    s = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _core._gather(t, perm, torch.argsort(perm), 0), (s,))
