"""Plots of `linear_bench.py` records: the linear-attention ops against dense SDPA per shape, and the one-token
decode steps' bandwidth against a plain device copy of the state.

    python3 benchmarks/plot_linear.py RESULTS.jsonl [MORE.jsonl ...] --out DIR

Writes, for what the records hold:
- ``linear_speed_fwd.png`` / ``linear_speed_fwdbwd.png``: one group of bars per shape (B x T), one bar per
  backend (median ms, log scale; successful rows only). A shape measured in several files takes the last one;
  shapes with dense SDPA rows only are left out.
- ``linear_decode.png``: GB/s against batch per step kernel (CUDA-graph rows), the ``copy-roof`` row dashed
  and the device's HBM peak dotted when the records carry it.
Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import os
import sys

from attnzoo.bench.speed import read_jsonl

# the order of the bars and lines; backends not listed follow alphabetically
ORDER = ("triton", "gla-triton", "gdn-triton", "kda-triton", "fla", "fla-gla", "fla-gdn", "fla-kda", "sdpa-cudnn",
         "sdpa-flash")
LABELS = {"triton": "simple GLA", "gla-triton": "GLA", "gdn-triton": "Gated DeltaNet", "kda-triton": "KDA",
          "fla": "fla simple GLA", "fla-gla": "fla GLA", "fla-gdn": "fla Gated DeltaNet", "fla-kda": "fla KDA",
          "sdpa-cudnn": "SDPA (cuDNN)", "sdpa-flash": "SDPA (flash)"}
DECODE = ("triton", "gla-step", "gdn-step", "kda-step")
DECODE_LABELS = {"triton": "linear", "gla-step": "GLA", "gdn-step": "Gated DeltaNet", "kda-step": "KDA"}


def load(paths: list[str]) -> list[dict]:
    """The records of every file, in order (lines that do not parse are skipped with a warning)."""
    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"plot_linear.py: no such file: {path}")
        rows += read_jsonl(path)
    return rows


def _key(backend: str):
    return (ORDER.index(backend) if backend in ORDER else len(ORDER), backend)


def speed_table(rows: list[dict], direction: str) -> dict:
    """{(B, T): {backend: median ms}} of the successful speed rows (the last record of each wins)."""
    out: dict = {}
    for r in rows:
        if r.get("kind") == "speed" and r.get("direction") == direction and r.get("status") == "ok" \
                and r.get("median_ms") is not None:
            out.setdefault((r["B"], r["T"]), {})[r["backend"]] = float(r["median_ms"])
    # a shape timed for the dense baselines alone (the decode runs' warm-up shape) has nothing to compare
    return {s: t for s, t in out.items() if any(not b.startswith("sdpa") for b in t)}


def decode_table(rows: list[dict]) -> tuple[dict, float | None]:
    """({backend: {B: GB/s}} of the successful CUDA-graph decode rows, the HBM peak in GB/s or None)."""
    out: dict = {}
    peak = None
    for r in rows:
        if r.get("kind") != "decode" or r.get("status") != "ok" or r.get("mode") != "graph":
            continue
        if r.get("gbps") is not None:
            out.setdefault(r["backend"], {})[r["B"]] = float(r["gbps"])
        if r.get("peak_bytes_s"):
            peak = float(r["peak_bytes_s"]) / 1e9
    return out, peak


def _title(rows: list[dict]) -> str:
    devs = sorted({r.get("device") for r in rows if r.get("device")})
    return ", ".join(devs) if devs else "device unknown"


def plot_speed(rows: list[dict], out: str, plt) -> list[str]:
    written = []
    for direction, slug in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        table = speed_table(rows, direction)
        if not table:
            continue
        shapes = sorted(table, key=lambda s: (s[0] * s[1], s[0]))
        backends = sorted({b for t in table.values() for b in t}, key=_key)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 2), 4.2))
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            xs = [i + (j - (len(backends) - 1) / 2) * width for i, s in enumerate(shapes) if b in table[s]]
            ys = [table[s][b] for s in shapes if b in table[s]]
            hatch = "//" if b.startswith("sdpa") else None
            ax.bar(xs, ys, width, label=LABELS.get(b, b), hatch=hatch)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{b} x {t}" for b, t in shapes])
        ax.set_yscale("log")
        ax.set_ylabel(f"{direction} time, ms (log)")
        ax.set_xlabel("B x T (16 heads, head dim 128)")
        ax.set_title(f"linear attention vs dense SDPA, {direction} ({_title(rows)})")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(axis="y", which="both", alpha=0.3)
        path = os.path.join(out, f"linear_speed_{slug}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_decode(rows: list[dict], out: str, plt) -> list[str]:
    table, peak = decode_table(rows)
    steps = [b for b in DECODE if b in table]
    if not steps:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for b in steps:
        bs = sorted(table[b])
        ax.plot(bs, [table[b][x] for x in bs], marker="o", label=DECODE_LABELS[b])
    if "copy-roof" in table:
        bs = sorted(table["copy-roof"])
        ax.plot(bs, [table["copy-roof"][x] for x in bs], "k--", label="device copy of the state")
    if peak:
        ax.axhline(peak, color="grey", linestyle=":", label=f"HBM peak {peak:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (16 heads, 128 x 128 float32 state each)")
    ax.set_ylabel("GB/s (state read + written)")
    ax.set_title(f"one-token decode steps, CUDA graphs ({_title(rows)})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = os.path.join(out, "linear_decode.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="linear_bench.jsonl files (later files win for the same shape)")
    ap.add_argument("--out", required=True, help="directory for the PNGs (created if missing)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_linear.py needs matplotlib: pip install 'attnzoo[bench]'") from None
    rows = load(args.results)
    os.makedirs(args.out, exist_ok=True)
    written = plot_speed(rows, args.out, plt) + plot_decode(rows, args.out, plt)
    if not written:
        raise SystemExit("plot_linear.py: no successful speed or decode records in " + ", ".join(args.results))
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
