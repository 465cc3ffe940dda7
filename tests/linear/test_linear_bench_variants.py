"""benchmarks/linear_bench.py's named config variants: the sweep's list, '+'-joined combinations for the speed
table (--gdn-variants), and the override the autograd path then reads (no GPU needed: only the config)."""
import pytest
import torch

from linear_helpers import load_benchmark


@pytest.fixture(scope="module")
def lb():
    return load_benchmark("linear_bench")


def test_variants_combine_and_unknown_names_stop(lb):
    names = [n for n, _ in lb.sweep_variants("gdn")]
    assert names[0] == "default" and len(names) == len(set(names))
    assert {"prep-split-dbl", "inv-dbl-w4", "h32w8", "main-split-k64v32b32w88"} <= set(names)
    over = lb.variant_overrides("gdn", "prep-split-dbl+main-split-k64v32b32w88+h32w8")
    assert over["prep"] == "split" and over["inv"] == "dbl" and over["main"] == "split" and over["BV_H"] == 32
    with pytest.raises(SystemExit, match="no sweep variant 'prep-apart'"):
        lb.variant_overrides("gdn", "h32w8+prep-apart")


def test_config_override_reaches_the_16_bit_cuda_config_only(lb):
    from attnzoo.linear import triton_delta as td
    cuda = torch.device("cuda")
    before = td.config(128, 128, torch.bfloat16, cuda)
    with lb.config_override("delta", {"prep": "split", "BV_H": 32}):
        got = td.config(128, 128, torch.bfloat16, cuda)
        assert got == dict(before, prep="split", BV_H=32)
        assert "prep" not in td.config(128, 128, torch.float32, cuda)           # float32 keeps its config
        assert "prep" not in td.config(32, 32, torch.float32, torch.device("cpu"))
    assert td.config(128, 128, torch.bfloat16, cuda) == before                  # restored after the block


def test_16_bit_cuda_defaults_are_valid_and_kda_keeps_its_own_main_backward():
    # Gated DeltaNet's default main backward is the three-pass one; KDA inherits the rest of that config but not
    # this choice (its fused main backward was faster on the H100) and reads its gate factors from one pass
    from attnzoo.linear import triton_delta as td
    from attnzoo.linear import triton_kda as tk
    cuda = torch.device("cuda")
    g = td.config(128, 128, torch.bfloat16, cuda)
    k = tk.config(128, 128, torch.bfloat16, cuda)
    for cfg in (g, k, td.config(64, 64, torch.float16, cuda), tk.config(64, 32, torch.float16, cuda)):
        td._check_cfg(cfg)
    assert (g["main"], g["BV_B"]) == ("seq", 64)
    assert (k["main"], k["BV_B"], k["pre"], k["unroll_i"]) == ("fused", 32, True, 2)
    assert (k["diag_lim"], k["diag_lim_b"], k["BK_I"]) == (20.0, 20.0, 64)        # the diagonal tiles as dots
    assert tk.config(32, 32, torch.bfloat16, cuda)["BK_I"] == 32
    assert "diag_lim" not in tk.config(128, 128, torch.float32, cuda)
    assert td.config(64, 32, torch.bfloat16, cuda)["BV_B"] == 32                # never wider than Dv
    assert "main" not in td.config(128, 128, torch.float32, cuda)


def test_every_sweep_variant_gives_a_valid_config_with_the_dots_on_by_default(lb):
    # the dots need the split intra kernels: a variant that picks another path runs without them (else the sweep
    # would record it as an error), one that names the limit keeps it
    from attnzoo.linear import triton_gla as tg
    from attnzoo.linear import triton_kda as tk
    cuda = torch.device("cuda")
    for op, mod in (("kda", tk), ("gla", tg)):
        default = mod.config(128, 128, torch.bfloat16, cuda)
        assert default["diag_lim"] > 0 and default["diag_lim_b"] > 0
        for name, over in lb.sweep_variants(op):
            mod._check_cfg(lb.variant_cfg(op, default, over))
        for name, over in (lb.KDA_CHECK_VARIANTS if op == "kda" else lb.GLA_CHECK_VARIANTS):
            cfg = lb.variant_cfg(op, default, over)
            assert cfg["diag_lim"] == over.get("diag_lim", cfg["diag_lim"])
    kda = tk.config(128, 128, torch.bfloat16, cuda)
    fused = lb.variant_cfg("kda", kda, dict(intra_b="fused"))
    assert (fused["diag_lim"], fused["diag_lim_b"]) == (20.0, 0.0)
    bcast = lb.variant_cfg("kda", kda, dict(diag="bcast", BKD=32))
    assert (bcast["diag_lim"], bcast["diag_lim_b"]) == (0.0, 20.0)
    assert lb.variant_cfg("kda", kda, dict(BK_I=16)) == dict(kda, BK_I=16)      # split kept: dots kept
    gla = tg.config(128, 128, torch.bfloat16, cuda)
    assert lb.variant_cfg("gla", gla, dict(intra="fused"))["diag_lim_b"] == 0.0
    assert lb.variant_cfg("gla", gla, dict(intra_f="fused"))["diag_lim"] == 0.0
    assert lb.variant_cfg("gdn", {"BT": 64}, {"BT": 32}) == {"BT": 32}
