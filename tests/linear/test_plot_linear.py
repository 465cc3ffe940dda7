"""benchmarks/plot_linear.py: PNGs from linear_bench records (synthetic here), the last record of a shape wins,
SDPA-only shapes are left out, lines that do not parse are skipped with a warning (as every results reader
here), and bad input stops with a message instead of a traceback."""
import json
import pathlib

import pytest

from linear_helpers import load_benchmark

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def pl():
    return load_benchmark("plot_linear")


def _speed(b, t, backend, direction, ms, status="ok"):
    return dict(kind="speed", B=b, T=t, backend=backend, direction=direction, status=status, median_ms=ms,
                device="test device")


def test_tables_and_pngs(pl, tmp_path):
    rows = [_speed(1, 8192, "gdn-triton", "fwd+bwd", 3.0), _speed(1, 8192, "sdpa-cudnn", "fwd+bwd", 2.0),
            _speed(1, 8192, "gdn-triton", "fwd+bwd", 2.5),                       # a later run of the same shape
            _speed(1, 8192, "kda-triton", "fwd+bwd", None, status="oom"),
            _speed(1, 1024, "sdpa-cudnn", "fwd+bwd", 0.3),                        # dense baseline alone
            dict(kind="decode", B=1, backend="gdn-step", mode="graph", status="ok", gbps=300.0,
                 peak_bytes_s=3.35e12),
            dict(kind="decode", B=64, backend="gdn-step", mode="graph", status="ok", gbps=2300.0),
            dict(kind="decode", B=64, backend="gdn-step", mode="eager", status="ok", gbps=2000.0),
            dict(kind="decode", B=64, backend="copy-roof", mode="graph", status="ok", gbps=2680.0)]
    assert pl.speed_table(rows, "fwd+bwd") == {(1, 8192): {"gdn-triton": 2.5, "sdpa-cudnn": 2.0}}
    assert pl.speed_table(rows, "fwd") == {}
    table, peak = pl.decode_table(rows)
    assert table == {"gdn-step": {1: 300.0, 64: 2300.0}, "copy-roof": {64: 2680.0}} and peak == 3350.0
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    written = pl.main([str(path), "--out", str(tmp_path / "plots")])
    assert sorted(pathlib.Path(p).name for p in written) == ["linear_decode.png", "linear_speed_fwdbwd.png"]
    assert all(pathlib.Path(p).stat().st_size > 1000 for p in written)


def test_bad_input_stops_with_a_message(pl, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        pl.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "speed"}\nnot json\n')
    with pytest.warns(UserWarning, match="bad.jsonl:2: not a JSON record"), \
            pytest.raises(SystemExit, match="no successful speed or decode records"):
        pl.main([str(bad), "--out", str(tmp_path)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(_speed(1, 8192, "gdn-triton", "fwd", None, status="error")) + "\n")
    with pytest.raises(SystemExit, match="no successful speed or decode records"):
        pl.main([str(empty), "--out", str(tmp_path)])
