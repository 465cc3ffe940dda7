"""The block-size tuner: pattern classes, the online search on the call's inputs, the on-disk cache,
and candidates that fail being skipped (run under the CPU interpreter)."""
import json
import os

import pytest
import torch

import attnzoo as az
from attnzoo.backends import reference_attention
from attnzoo.testing import check_close

from common import inputs

pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package (extra 'gpu')")
from attnzoo.backends.triton import ops, tuning  # noqa: E402

# the searches below launch the kernels on CPU tensors: under Triton's interpreter only (conftest sets it where there
# is no GPU; on a GPU machine CPU tensors cannot reach a compiled kernel)
cpu_kernels = pytest.mark.skipif(not ops.interpreting(),
                                 reason="launches the kernels on CPU tensors (TRITON_INTERPRET=1 only)")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_cache", None)
    yield tmp_path
    monkeypatch.setattr(tuning, "_cache", None)


def test_pattern_classes():
    assert tuning.pattern_class(None) == "dense"
    assert tuning.pattern_class(az.Causal()) == "dense"
    assert tuning.pattern_class(az.Document([3, 4]) & az.Causal()) == "dense"
    assert tuning.pattern_class(az.SlidingWindow(8) | az.Sinks(2)) == "local"
    assert tuning.pattern_class(az.Neighborhood((3, 3), grid=(4, 4))) == "nbhd"
    assert tuning.pattern_class(az.SlidingWindow(4095)) == "wide"
    assert tuning.pattern_class(az.SlidingWindow(2047, 2048)) == "wide"
    assert tuning.pattern_class(az.SlidingWindow(4094)) == "local"
    assert tuning.pattern_class(az.Sinks(4) | az.SlidingWindow(4095)) == "local"


def test_defaults_without_search(fresh_cache):
    dense = tuning.default("fwd", 128, 128, "dense")
    assert dense["PACK"] == 2 and dense["BLOCK_M"] * dense["PACK"] == 128 and dense["BLOCK_N"] == 128
    assert dense["UNPACKED"] == dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, IDX=2, TMA=True)
    assert dense["IDX"] == 2 and dense["TMA"]
    local = tuning.default("fwd", 128, 128, "local")
    assert local["PACK"] == 4 and local["BLOCK_M"] * local["PACK"] == 256 and not local.get("TMA")
    # one merged loop over full and partial blocks on the local class only (it lost on the dense tiles)
    assert local["MERGE"] and not dense.get("MERGE") and not local["UNPACKED"].get("MERGE")
    # block 0 as a 16-key tile where it holds only sinks (H100, sinks + window 1.48 -> 1.50x flex at 64K)
    assert local["NARROW"] == 16 and not dense.get("NARROW") and not local["UNPACKED"].get("NARROW")
    # windows of >= 4096 keys take the local default since it merged its loops (H100: 3.850 -> 3.650 ms at 16K); where
    # the Gluon forward applies (D = Dv = 128 only), the dense class runs its warp-specialised kernel and the local and
    # wide classes its persistent form (H100, 16K: window 1024 1.188 -> 1.024 ms, window 4096 3.580 -> 2.960)
    wide = tuning.default("fwd", 128, 128, "wide")
    assert {k: v for k, v in wide.items() if k != "GLUON_CFG"} == {k: v for k, v in local.items() if k != "GLUON_CFG"}
    assert dense["GLUON_CFG"] == dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, PACK=2, IDX=2, GLUON="ws")
    assert wide["GLUON_CFG"] == dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, PACK=2, IDX=2, GLUON="wsp",
                                     QBUF=2, ORDER=1, REGS=240, NARROW=16, MASK_FAR=True, NARROW_LAST=2)
    # XPIPE (each item's first scores with the previous item's last P V) on the local class only (thirtieth session,
    # H100, 16K: window 1024 1.006 -> 0.982 ms; window 4096 2.908 -> 3.109, slower)
    # and with the narrow sink tile at each item's end (XPIPE_NARROW, thirty-first session: sinks + window 1.079 ->
    # 1.062 ms), then with the sinks folded into a partial block instead (XPIPE_NARROW="fold", thirty-second session:
    # 1.052 -> 1.022 ms)
    assert local["GLUON_CFG"] == dict(wide["GLUON_CFG"], XPIPE=True, XPIPE_NARROW="fold")
    assert "GLUON_CFG" not in tuning.default("fwd", 128, 128, "nbhd")
    assert "GLUON_CFG" not in tuning.default("fwd", 64, 64, "dense")
    nbhd = tuning.default("fwd", 128, 128, "nbhd")
    assert (nbhd["BLOCK_M"], nbhd["BLOCK_N"], nbhd["PACK"]) == (32, 32, 4) and nbhd["UNPACKED"]["BLOCK_M"] == 64
    assert (nbhd["IDX"], nbhd["MERGE"]) == (1, True) and not nbhd["UNPACKED"].get("MERGE")
    assert tuning.default("bwd", 128, 128, "local")["TMA"] and "TMA" not in tuning.default("bwd", 256, 256, "local")
    # the backward's Gluon kernels as measured (H100): both on every class of D = Dv = 128 but the neighborhoods, the
    # dk / dv kernel's transposed form with lse / delta by TMA (T_STATS, thirty-fifth session), the dq kernel
    # persistent (with DQ_PIPE and DQ_PREF, the twenty-ninth session's measurement); none on other head dims
    both = dict(T_STATS=True, num_stages=3, GLUON_DQ=True, DQ_STAGES=3, DQ_PERSIST=True, DQ_PIPE=True, DQ_PREF=True)
    assert all(tuning.default("bwd", 128, 128, c)["GLUON_BWD"] == both for c in ("wide", "dense", "local"))
    assert all("GLUON_BWD" not in tuning.default("bwd", d, d, c) for d, c in ((128, "nbhd"), (64, "local"),
                                                                               (256, "dense")))
    # float32 calls keep the pointer loads (TMA was measured on 16-bit inputs)
    plain = tuning.without_tma(dense)
    assert "TMA" not in plain and "TMA" not in plain["UNPACKED"] and dense["TMA"] and dense["UNPACKED"]["TMA"]
    assert {k: v for k, v in plain.items() if k != "UNPACKED"} == {k: v for k, v in dense.items()
                                                                      if k not in ("TMA", "UNPACKED")}
    assert tuning.default("fwd", 64, 64, "local")["PACK"] == 2
    assert tuning.default("fwd", 128, 128, "local")["UNPACKED"]["BLOCK_M"] == 64
    assert tuning.default("bwd", 256, 256, "local")["BLOCK_N"] == 32
    # on CPU without tuning: the interpreter's small tiles; nothing is written
    assert ops.config(32, 32, torch.device("cpu"), az.Causal())["BLOCK_M"] == 16
    assert not os.path.exists(tuning._path())


@cpu_kernels
def test_online_search_caches_the_winner(fresh_cache, monkeypatch):
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 24, 24, 32, 32))
    p = az.SlidingWindow(5)
    with tuning.autotuning(True):
        out, lse = ops.attention_fwd(q, k, v, p, 32 ** -0.5)
    check_close("out", out, reference_attention(q, k, v, p)[0])
    data = json.load(open(tuning._path()))
    (key, entry), = data.items()
    assert "|fwd|d32|dv32|float32|local" in key and len(entry["tried"]) == 2
    assert entry["config"] in [{k: c[k] for k in entry["config"]} for c in entry["tried"]]
    # a second call (even in a new process: memory cache dropped) reuses the winner without searching
    monkeypatch.setattr(tuning, "_cache", None)
    monkeypatch.setattr(tuning, "search", lambda *a, **kw: pytest.fail("searched again"))
    with tuning.autotuning(True):
        out2, _ = ops.attention_fwd(q, k, v, p, 32 ** -0.5)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    tuning.clear()
    assert not os.path.exists(tuning._path())


@cpu_kernels
def test_backward_search_and_failing_candidates(fresh_cache):
    q, k, v = (t.detach().float() for t in inputs(1, 2, 1, 20, 20, 32, 32))
    p = az.Causal()
    out, lse = ops.attention_fwd(q, k, v, p, 0.2)
    do = torch.randn_like(out)
    run = lambda c: ops.attention_bwd(do, None, q, k, v, out, lse, p, 0.2, cfg=c)
    bad = dict(BLOCK_M=24, BLOCK_N=16, num_warps=1, num_stages=1)  # not a power of two: fails to compile
    good = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    best = tuning.search("bwd", 32, 32, torch.float32, p, torch.device("cpu"), run, cands=[bad, good])
    assert best == good
    entry = next(iter(json.load(open(tuning._path())).values()))
    assert entry["tried"][0]["ms"] is None and "error" in entry["tried"][0]
    with pytest.raises(RuntimeError, match="no bwd config ran"):
        tuning.search("bwd", 32, 32, torch.float32, p, torch.device("cpu"), run, cands=[bad])


def test_overrides_merge_over_the_config(monkeypatch):
    monkeypatch.delenv("ATTNZOO_TRITON_OVERRIDE", raising=False)
    wide = tuning.default("bwd", 128, 128, "wide")
    tail = {"GLUON_BWD": {"TAIL_ORDER": True}}
    merged = tuning._overridden("bwd", "wide", wide)
    assert merged == wide  # nothing in force
    with tuning.overriding("bwd", tail):
        merged = tuning._overridden("bwd", "wide", wide)
        # the nested kernel settings are merged key by key, the rest of the config kept
        assert merged["GLUON_BWD"] == dict(wide["GLUON_BWD"], TAIL_ORDER=True)
        assert {k: v for k, v in merged.items() if k != "GLUON_BWD"} == {k: v for k, v in wide.items()
                                                                        if k != "GLUON_BWD"}
        assert ops.gluon_bwd_settings(merged["GLUON_BWD"], 128)["TAIL_ORDER"] is True
        # the forward and a class whose config runs no Gluon backward are left alone
        assert tuning._overridden("fwd", "wide", tuning.default("fwd", 128, 128, "wide")) == \
            tuning.default("fwd", 128, 128, "wide")
        nbhd = tuning.default("bwd", 128, 128, "nbhd")
        assert "GLUON_BWD" not in nbhd and tuning._overridden("bwd", "nbhd", nbhd) == nbhd
        with tuning.overriding("bwd", {"GLUON_BWD": None, "BLOCK_N": 32}, pclass="local"):  # inner block, one class
            local = tuning._overridden("bwd", "local", tuning.default("bwd", 128, 128, "local"))
            assert "GLUON_BWD" not in local and local["BLOCK_N"] == 32
            assert tuning._overridden("bwd", "wide", wide)["GLUON_BWD"]["TAIL_ORDER"] is True
    assert tuning._overridden("bwd", "wide", wide) == wide and not tuning._overrides  # restored on exit
    with pytest.raises(RuntimeError), tuning.overriding("bwd", tail):  # ... also when the block raises
        raise RuntimeError
    assert not tuning._overrides
    assert wide == tuning.default("bwd", 128, 128, "wide")  # the table itself is untouched


def test_override_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNZOO_TRITON_OVERRIDE", json.dumps({"bwd@wide": {"GLUON_BWD": {"SPLIT_CAP": 9}},
                                                              "fwd": {"BLOCK_M": 32}}))
    wide = tuning.default("bwd", 128, 128, "wide")
    assert tuning._overridden("bwd", "wide", wide)["GLUON_BWD"]["SPLIT_CAP"] == 9
    assert tuning._overridden("bwd", "dense", tuning.default("bwd", 128, 128, "dense")) == \
        tuning.default("bwd", 128, 128, "dense")
    # choose applies it to every answer, the interpreter's config included; a block's override comes after it
    assert tuning.choose("fwd", 32, 32, torch.float32, az.Causal(), torch.device("cpu"))["BLOCK_M"] == 32
    with tuning.overriding("fwd", {"BLOCK_M": 64}):
        assert ops.config(32, 32, torch.device("cpu"), az.Causal())["BLOCK_M"] == 64
    for bad, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                       ('{"bwdx": {}}', "kind must be"), ('{"bwd@huge": {}}', "pattern class"),
                       ('{"bwd": 3}', "settings must be")):
        monkeypatch.setenv("ATTNZOO_TRITON_OVERRIDE", bad)
        with pytest.raises(ValueError, match=match):
            tuning.choose("bwd", 32, 32, torch.float32, az.Causal(), torch.device("cpu"))
    with pytest.raises(ValueError, match="kind must be"), tuning.overriding("decode", {}):
        pass
    assert not tuning._overrides


@cpu_kernels
def test_override_reaches_the_kernels(fresh_cache, monkeypatch):
    # an override of the block sizes runs the interpreted kernels on those tiles, and they still match float64
    monkeypatch.delenv("ATTNZOO_TRITON_OVERRIDE", raising=False)
    q, k, v = (t.detach().float() for t in inputs(1, 2, 2, 40, 40, 32, 32, seed=3))
    seen = []
    real = tuning._overridden
    monkeypatch.setattr(tuning, "_overridden", lambda *a: seen.append(real(*a)) or seen[-1])
    with tuning.overriding("fwd", {"BLOCK_M": 32, "BLOCK_N": 32}):
        out = az.attention(q, k, v, pattern=az.SlidingWindow(7), backend="triton")
    assert seen and all(c["BLOCK_M"] == 32 and c["BLOCK_N"] == 32 for c in seen)
    check_close("out", out, reference_attention(q.double(), k.double(), v.double(), az.SlidingWindow(7))[0])


def test_bench_records_the_override(monkeypatch):
    from attnzoo.bench import speed
    monkeypatch.delenv("ATTNZOO_TRITON_OVERRIDE", raising=False)
    assert "attnzoo_triton_override" not in speed.environment("cpu")
    monkeypatch.setenv("ATTNZOO_TRITON_OVERRIDE", '{"bwd": {"BLOCK_N": 32}}')
    assert speed.environment("cpu")["attnzoo_triton_override"] == '{"bwd": {"BLOCK_N": 32}}'


def test_overriding_json_applies_each_entry_for_the_block():
    text = json.dumps({"bwd@wide": {"GLUON_BWD": {"TAIL_ORDER": True}}, "fwd": {"BLOCK_M": 32}})
    wide = tuning.default("bwd", 128, 128, "wide")
    with tuning.overriding_json(text):
        assert tuning._overridden("bwd", "wide", wide)["GLUON_BWD"]["TAIL_ORDER"] is True
        assert tuning._overridden("fwd", "local", {"BLOCK_M": 64})["BLOCK_M"] == 32
        assert tuning._overridden("bwd", "dense", {"BLOCK_M": 64}) == {"BLOCK_M": 64}
    assert not tuning._overrides
    with pytest.raises(ValueError, match="kind must be"), tuning.overriding_json('{"decode": {}}'):
        pass
    assert not tuning._overrides
