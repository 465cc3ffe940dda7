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
    assert td.config(64, 32, torch.bfloat16, cuda)["BV_B"] == 32                # never wider than Dv
    assert "main" not in td.config(128, 128, torch.float32, cuda)
