"""Needle-in-a-haystack benchmark: generator invariants, pattern swapping, and a tiny resumable CLI run."""
from __future__ import annotations

import json

import pytest
import torch

import attnzoo as az
from attnzoo.bench import niah as N
from attnzoo.cli import main

V = N.Vocab(96, 16, 16)


@pytest.mark.parametrize("P", [1, 4])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_depth_and_answer(P, depth):
    L = 80
    x, y, info = N.niah(32, L, depth, P, V, seed=3, return_info=True)
    H = info["haystack"]
    assert H == L - 2 - 3 * P
    pos = info["needle_pos"]
    keys, values = info["keys"], info["values"]
    for i in range(x.shape[0]):
        p = int(pos[i])
        # the queried needle: MARK key value, after round(depth * H) filler tokens
        assert x[i, p].item() == N.MARK
        assert x[i, p + 1].item() == keys[i, 0, 0].item() and x[i, p + 2].item() == values[i, 0, 0].item()
        filler_before = int((x[i, :p] >= V.filler_lo).sum())
        assert filler_before == round(depth * H) or abs(filler_before - depth * H) <= 0.5
        # the query at the end and the only target: the value
        assert x[i, L - 2].item() == N.MARK and x[i, L - 1].item() == keys[i, 0, 0].item()
        assert (y[i] != -100).nonzero().flatten().tolist() == [L - 1]
        assert y[i, L - 1].item() == values[i, 0, 0].item()
        # P needles + the query marker; distinct keys; the queried key occurs once before the query
        assert int((x[i] == N.MARK).sum()) == P + 1
        assert len(set(keys[i, :, 0].tolist())) == P
        assert int((x[i, :L - 2] == keys[i, 0, 0]).sum()) == 1
    # filler positions hold only filler tokens: never the marker, a key or a value
    fill = x[:, :L - 2][(x[:, :L - 2] >= V.filler_lo)]
    assert fill.numel() == 32 * H and int(fill.min()) >= V.filler_lo and int(fill.max()) < V.size
    assert int(((x[:, :L - 2] > 0) & (x[:, :L - 2] < V.filler_lo)).sum()) == 32 * P * 3


def test_depth_extremes_and_multitoken():
    x, y, info = N.niah(4, 40, 0.0, 1, V, key_len=2, value_len=3, seed=0, return_info=True)
    assert (info["needle_pos"] == 0).all()
    assert (y != -100).sum(1).tolist() == [3] * 4
    assert torch.equal(y[:, -3:], info["values"][:, 0])
    assert (x[:, -5] == N.MARK).all() and torch.equal(x[:, -4:-2], info["keys"][:, 0]) and torch.equal(x[:, -2:], info["values"][:, 0, :2])
    x, y, info = N.niah(4, 40, 1.0, 1, V, seed=0, return_info=True)
    assert (info["needle_pos"] == 40 - 2 - 3).all()  # right before the query


def test_determinism_and_splits():
    a = N.niah_data("test", 8, "multikey", 64, 0.5, 4, V, seed=1)
    b = N.niah_data("test", 8, "multikey", 64, 0.5, 4, V, seed=1)
    c = N.niah_data("train", 8, "multikey", 64, 0.5, 4, V, seed=1)
    d = N.niah_data("test", 8, "multikey", 64, 0.5, 4, V, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    with pytest.raises(ValueError):
        N.niah(1, 10, 0.5, 4, V)
    with pytest.raises(ValueError):
        N.niah(1, 64, 1.5, 1, V)


def test_parse_method():
    assert N.parse_method("dense") == az.Causal()
    assert N.parse_method("window:64") == az.SlidingWindow(63)
    assert repr(N.parse_method("streaming:4,64")) == repr(az.Sinks(4) | az.SlidingWindow(63))
    assert N.parse_method("dilated:8,2") == az.Dilated(8, 2)
    for bad in ("nope", "window", "window:0", "dilated:3", "window:x"):
        with pytest.raises(ValueError):
            N.parse_method(bad)


def test_parse_router_methods():
    from attnzoo import routing as R
    assert N.parse_method("topk:16:3") == R.TopKBlocks(16, top_k=3)
    assert N.parse_method("longheads:8:2") == R.LongHeads(8, 2)
    assert N.parse_method("landmark:8:2") == R.Landmark(8, 2)
    assert N.parse_method("vslash:16:30:50") == R.VerticalSlash(30, 50, block_size=16)
    assert N.parse_method("flexprefill:32:0.9") == R.FlexPrefill(32, gamma=0.9)
    assert N.parse_method("FlexPrefill:32:0.8:0.2") == R.FlexPrefill(32, gamma=0.8, tau=0.2)
    if hasattr(R, "HiP"):
        assert N.parse_method("hip:8:2") == R.HiP(8, 2)
    for bad, words in (("topk:16", "expected topk:B:K"), ("topk:16:x", "must be an integer"),
                       ("topk:16:0", "top_k"), ("flexprefill:16:1.5", "gamma"), ("flexprefill:16", "expected"),
                       ("vslash:16:3", "expected"), ("landmark:8:2:1", "expected"), ("flexprefill:8:a", "number")):
        with pytest.raises(ValueError, match=words):
            N.parse_method(bad)
    assert "vslash:B:V:S" in N.method_names()


def test_router_as_layer_pattern_and_measured_density():
    """A router set as every Attention layer's pattern runs the model; a full-coverage router equals dense; the
    measured density counts the visible pairs of every call."""
    from attnzoo import routing as R
    g = N.NiahGrid(name="t", vocab_size=96, n_keys=16, n_values=16, d_model=32, n_layers=2)
    torch.manual_seed(0)
    model = N.build_model(g).eval()
    x, _ = N.niah(2, 48, 0.0, 1, V, seed=0)
    with torch.no_grad():
        dense = model(x)
        full = N.MeasuredRouter(R.TopKBlocks(8, top_k=6))
        with N.use_pattern(model, full):
            assert torch.allclose(model(x), dense, atol=1e-5)
        assert full.density == pytest.approx(az.Causal().density(48, 48))
        sparse = N.MeasuredRouter(N.parse_method("topk:8:1"))
        assert sparse.density is None
        with N.use_pattern(model, sparse):
            out = model(x)
        assert (out - dense).abs().max() > 1e-4 and 0 < sparse.density < full.density
        # the count: pairs of each router block mask, as evaluate() measures them
        q = torch.randn(2, 4, 40, 8)
        k = torch.randn(2, 2, 48, 8)
        r = R.TopKBlocks(8, top_k=1)
        want = R.evaluate(q, k, k, r)["pair_density"].mean().item()
        assert N._visible_pairs(r(q, k), 40, 48, 8, True) / (2 * 4 * 40 * 48) == pytest.approx(want)


def test_router_methods_in_a_tiny_grid(tmp_path):
    g = N.NiahGrid(name="t", train_len=32, lengths=(32, 64), depths=(0.0,), tasks=("single",),
                   methods=("dense", "topk:8:1", "vslash:8:2:2", "flexprefill:8:0.9"), vocab_size=96, n_keys=16,
                   n_values=16, d_model=32, steps=2, n_train=32, n_val=8, eval_every=2, n_test=4, eval_batch_size=4)
    recs = N.run_grid(g, tmp_path, device="cpu", progress=False)
    assert len(recs) == 4 * 2 and all(r["status"] == "ok" for r in recs), [r.get("message") for r in recs]
    for r in recs:
        causal = az.Causal().density(r["length"], r["length"])
        assert r["density_source"] == ("static" if r["method"] == "dense" else "measured")
        assert 0 < r["density"] <= causal + 1e-12
    assert any(r["density"] < az.Causal().density(64, 64) for r in recs if r["method"] == "topk:8:1")
    assert "TopKBlocks(block_size=8" in next(r["pattern"] for r in recs if r["method"] == "topk:8:1")


def test_pattern_swap_changes_outputs_and_restores():
    g = N.NiahGrid(name="t", vocab_size=96, n_keys=16, n_values=16, d_model=32, n_layers=2)
    torch.manual_seed(0)
    model = N.build_model(g).eval()
    x, _ = N.niah(2, 48, 0.0, 1, V, seed=0)
    with torch.no_grad():
        dense = model(x)
        with N.use_pattern(model, N.parse_method("window:8")) as m:
            assert all(a.pattern == az.SlidingWindow(7) for a in N.attention_layers(m))
            win = model(x)
        with N.use_pattern(model, N.parse_method("window:64")):
            wide = model(x)  # a window wider than the context is dense attention
        again = model(x)
    assert all(a.pattern == az.Causal() for a in N.attention_layers(model))
    assert torch.allclose(dense[:, :8], win[:, :8], atol=1e-5)      # the first 8 positions see everything
    assert (dense[:, -1] - win[:, -1]).abs().max() > 1e-4           # the last one does not
    assert torch.allclose(dense, wide, atol=1e-5) and torch.equal(dense, again)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_tiny_run_resumes_and_reports(tmp_path, capsys):
    args = ["bench", "niah", "--out", str(tmp_path), "--steps", "3", "--train-len", "32", "--lengths", "32,64",
            "--depths", "0,1", "--methods", "dense,window:8", "--niah-tasks", "single,multikey", "--n-train", "64",
            "--n-test", "4", "--d-model", "32", "--eval-every", "3", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    recs = _records(tmp_path / N.RESULTS_FILE)
    assert len(recs) == 2 * 2 * 2 * 2 and all(r["status"] == "ok" for r in recs)
    assert {(r["method"], r["length"], r["depth"], r["task"]) for r in recs} == {
        (m, L, d, t) for m in ("dense", "window:8") for L in (32, 64) for d in (0.0, 1.0)
        for t in ("single", "multikey")}
    assert all(0.0 <= r["acc"] <= 1.0 and r["answers"] == 4 for r in recs)
    ckpts = list(tmp_path.glob("niah_model_*.pt"))
    assert len(ckpts) == 1
    mtime = ckpts[0].stat().st_mtime_ns
    report = (tmp_path / N.REPORT_FILE).read_text()
    assert "`window:8`" in report and "length \\ depth" in report
    assert (tmp_path / "niah_acc_vs_length.png").exists()
    assert (tmp_path / "niah_heatmap_single_window_8.png").exists()
    # second run: every cell skipped, the model not retrained
    assert main(args) == 0
    assert len(_records(tmp_path / N.RESULTS_FILE)) == len(recs)
    assert ckpts[0].stat().st_mtime_ns == mtime
    # a new depth: only its cells run, with the saved model
    assert main(args[:-1] + ["--quiet"] + ["--depths", "0,0.5,1"]) == 0
    assert len(_records(tmp_path / N.RESULTS_FILE)) == len(recs) + 8
    assert len(list(tmp_path.glob("niah_model_*.pt"))) == 1
    assert main(["bench", "niah", "--out", str(tmp_path), "--report-only"]) == 0


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "niah", "--out", str(tmp_path), "--methods", "bogus:1", "--dry-run"])
    with pytest.raises(SystemExit):
        main(["bench", "niah", "--out", str(tmp_path), "--mixer", "attention", "--dry-run"])
    with pytest.raises(SystemExit):
        main(["bench", "--depths", "0.5", "--dry-run"])
    assert main(["bench", "niah", "--dry-run", "--out", str(tmp_path)]) == 0


def test_cli_method_lists_keep_numeric_fields_together():
    from attnzoo.cli import _split_list
    assert _split_list(["dense,streaming:4,64", "dilated:32,4,window:8"]) == [
        "dense", "streaming:4,64", "dilated:32,4", "window:8"]
    assert _split_list(["topk:64:4,flexprefill:128:0.9"]) == ["topk:64:4", "flexprefill:128:0.9"]
