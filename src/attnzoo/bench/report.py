"""Turn a ``results.jsonl`` into ``report.md`` and PNG plots.

- Per pattern and direction: a table with one row per length and one column per backend (median ms and
  effective TFLOP/s), and the fraction of ideal of each backend.
- The best fraction of ideal per pattern and length, and every measurement that did not succeed, with why.
- Peak memory (CUDA runs): a table per direction (GiB, one column per backend, OOMs marked) and a plot of
  peak memory vs length per pattern, one line per backend.
- Plots (matplotlib, Agg, no pyplot state): time vs length per pattern (log2 length axis, log time axis,
  p20-p80 bars, the fastest dense time for comparison), the fraction of ideal per pattern as bars, and peak
  memory vs length (GiB). Without matplotlib the plots are skipped and report.md says so.
- Records of several shapes in one file (suites side by side, the FlashAttention grid's head dims 64 and
  128) get one set of sections per shape group (dtype, heads, head dim); B may vary inside a group.
"""
from __future__ import annotations

import datetime as _dt
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .gpu_state import MIN_POWER_WINDOW_S
from .speed import (DIRECTION_LABELS, RESULTS_FILE, dense_baselines, latest_records, load_records,
                    with_derived)

_STATUS_SHORT = {"oom": "OOM", "unsupported": "unsupported", "error": "error"}
_BACKEND_ORDER = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "sdpa", "flash-attn", "xformers",
                  "natten", "flex", "flex-eager", "triton", "reference")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_").lower() or "x"


def _backend_key(b: str):
    base = "triton" if _is_triton(b) else b  # a variant (triton[NAME]) right after triton
    return (_BACKEND_ORDER.index(base) if base in _BACKEND_ORDER else len(_BACKEND_ORDER), b)


def _is_triton(b: str) -> bool:
    return b == "triton" or (b.startswith("triton[") and b.endswith("]"))


def _len_label(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _tf(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 1 else f"{x:.3f}")


def _md_table(headers, rows, numeric: bool = True) -> str:
    """A markdown table; with ``numeric`` every column but the first is right-aligned."""
    def esc(c):
        return str(c).replace("|", "\\|")
    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "|" + "|".join("---" if (i == 0 or not numeric) else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pattern_order(records) -> list:
    order = []
    for r in records:
        if r["pattern"] not in order:
            order.append(r["pattern"])
    # the dense baseline first, causal next, the rest in order of appearance
    return sorted(order, key=lambda p: (p != "full", p != "causal", order.index(p)))


def prepare(records) -> list:
    """Latest record per case, with flops / tflops / frac_ideal recomputed over the whole file."""
    latest = latest_records(records)
    base = dense_baselines(latest)
    return [with_derived(r, base) for r in latest]


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _figure(w=7.5, h=5.0):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=120)
    return fig, fig.add_subplot(1, 1, 1)


def _shape_text(r) -> str:
    return f"{r['dtype']}, B={r['B']}, Hq={r['Hq']}, Hkv={r['Hkv']}, D={r['D']}"


def plot_time_vs_length(recs, dense_recs, path: Path, *, pattern: str, direction: str, device: str,
                        shape: Optional[str] = None) -> bool:
    """Median time per call vs length, one line per backend (log2 x, log y). Returns False if nothing ok."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        return False
    shape = shape or _shape_text(ok[0])
    fig, ax = _figure()
    by_backend = defaultdict(list)
    for r in ok:
        by_backend[r["backend"]].append(r)
    markers = "osD^v<>ph*"
    for i, b in enumerate(sorted(by_backend, key=_backend_key)):
        rs = sorted(by_backend[b], key=lambda r: r["Lq"])
        xs = [r["Lq"] for r in rs]
        ys = [r["median_ms"] for r in rs]
        lo = [max(0.0, r["median_ms"] - (r.get("p20_ms") or r["median_ms"])) for r in rs]
        hi = [max(0.0, (r.get("p80_ms") or r["median_ms"]) - r["median_ms"]) for r in rs]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], linewidth=1.8, markersize=6,
                    capsize=3, label=b)
    if pattern != "full":
        best = {}
        for r in dense_recs:
            if r.get("status") == "ok" and (r["Lq"] not in best or r["median_ms"] < best[r["Lq"]][0]):
                best[r["Lq"]] = (r["median_ms"], r["backend"])
        lens = sorted(L for L in best if L in {r["Lq"] for r in ok})
        if lens:
            ax.plot(lens, [best[L][0] for L in lens], linestyle="--", color="0.45", marker="x", linewidth=1.2,
                    label="dense (fastest full attention)")
    lengths = sorted({r["Lq"] for r in ok})
    if len(lengths) == 1:
        return _plot_single_length(ok, dense_recs, path, pattern=pattern, direction=direction, device=device,
                                   shape=shape)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(lengths, [_len_label(L) for L in lengths])
    if len(lengths) == 1:
        ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)
    _decade_ylim(ax)
    ax.set_xlabel("sequence length L (tokens, log2 scale)")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"{pattern} — {DIRECTION_LABELS.get(direction, direction)}\n{device}; {shape}", fontsize=10)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return True


def _decade_ylim(ax) -> None:
    """Extend a log y axis to whole decades, so that it always shows at least two labelled ticks."""
    import math
    lo, hi = ax.get_ylim()
    if lo > 0 and hi > 0:
        ax.set_ylim(10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))


def _plot_single_length(ok, dense_recs, path: Path, *, pattern: str, direction: str, device: str,
                        shape: Optional[str] = None) -> bool:
    """A pattern measured at one length (the N-D neighborhoods): one bar per backend, plus the dense time."""
    L = ok[0]["Lq"]
    shape = shape or _shape_text(ok[0])
    rows = sorted(ok, key=lambda r: _backend_key(r["backend"]))
    names = [r["backend"] for r in rows]
    times = [r["median_ms"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    if pattern != "full":
        dense = [r for r in dense_recs if r.get("status") == "ok" and r["Lq"] == L]
        if dense:
            best = min(dense, key=lambda r: r["median_ms"])
            names.append(f"dense\n({best['backend']})")
            times.append(best["median_ms"])
            colors.append("0.6")
    fig, ax = _figure(max(5.5, 1.1 * len(names) + 2.5), 5.0)
    bars = ax.bar(range(len(names)), times, color=colors, width=0.6)
    for bar, t in zip(bars, times):
        ax.annotate(f"{_ms(t)} ms", (bar.get_x() + bar.get_width() / 2, t), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    _decade_ylim(ax)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(f"backend (L = {_len_label(L)} tokens, the pattern's fixed size)")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"{pattern} — {DIRECTION_LABELS.get(direction, direction)}\n{device}; {shape}", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.35)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_frac_ideal(best: dict, path: Path, *, direction: str, device: str, shape: str) -> bool:
    """Grouped bars: x = pattern, one bar per length; best backend's fraction of ideal."""
    patterns = [p for p in best if p != "full" and best[p]]
    if not patterns:
        return False
    lengths = sorted({L for p in patterns for L in best[p]})
    fig, ax = _figure(max(7.5, 1.3 * len(patterns) + 2), 5.2)
    n = len(lengths)
    width = 0.8 / max(n, 1)
    top = 1.0
    for j, L in enumerate(lengths):
        xs, ys, labels = [], [], []
        for i, p in enumerate(patterns):
            if L in best[p]:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(best[p][L][0])
                labels.append(best[p][L][1])
        if not xs:
            continue
        bars = ax.bar(xs, ys, width=width * 0.92, label=f"L={_len_label(L)}")
        for bar, y, b in zip(bars, ys, labels):
            ax.annotate(f"{y:.2f} {b}", (bar.get_x() + bar.get_width() / 2, y), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
        top = max(top, max(ys))
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="ideal (time ∝ FLOPs)")
    ax.set_xticks(range(len(patterns)), patterns, rotation=25, ha="right")
    ax.set_ylim(0, top * 1.45)
    ax.set_xlabel("pattern")
    ax.set_ylabel("fraction of ideal speed-up\n(dense ms / ms) / (dense FLOPs / FLOPs)")
    ax.set_title(f"Fraction of ideal (best backend, named on each bar) — {DIRECTION_LABELS.get(direction, direction)}\n"
                 f"{device}; {shape}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.35)
    ax.legend(fontsize=8, loc="upper right", ncol=n + 1)
    fig.tight_layout()
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------------------------------
# shape groups (a results file may hold several suites, or head dims, side by side)
# --------------------------------------------------------------------------------------------------
def _group_key(r) -> tuple:
    return (str(r.get("dtype")), r.get("Hq"), r.get("Hkv"), r.get("D"), r.get("Dv"), r.get("sustain_s"))


def _shape_groups(recs) -> list:
    """[(key, records)] by (dtype, Hq, Hkv, D, Dv, sustain_s), in order of appearance (B may vary inside a group: the
    FlashAttention grid holds B * L constant; sustained measurements are their own group)."""
    out = {}
    for r in recs:
        out.setdefault(_group_key(r), []).append(r)
    return list(out.items())


def _batch_text(recs) -> str:
    bs = sorted({r.get("B") for r in recs})
    if len(bs) == 1:
        return f"B={bs[0]}"
    toks = {r.get("B") * r.get("Lq") for r in recs}
    if len(toks) == 1:
        return f"B·L={_len_label(toks.pop())} tokens"
    return f"B={bs[0]}…{bs[-1]}"


def _group_text(recs, short: bool = False) -> str:
    """The shape of a group of records: ``short`` for headings (D and heads), else every parameter."""
    r0 = recs[0]
    dv = f", Dv={r0.get('Dv')}" if r0.get("Dv") not in (None, r0.get("D")) else ""
    sus = f", after {r0['sustain_s']:g} s of load" if r0.get("sustain_s") else ""
    if short:
        return f"D={r0.get('D')}{dv}, Hq={r0.get('Hq')}, Hkv={r0.get('Hkv')}{sus}"
    return (f"{r0.get('dtype')}, {_batch_text(recs)}, Hq={r0.get('Hq')}, Hkv={r0.get('Hkv')}, D={r0.get('D')}{dv}"
            f"{sus}")


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------
GIB = float(2 ** 30)


def _gib(x) -> str:
    if x is None:
        return "-"
    g = x / GIB
    return f"{g:.0f}" if g >= 100 else (f"{g:.1f}" if g >= 10 else (f"{g:.2f}" if g >= 0.1 else f"{g:.3f}"))


def _mem_cell(r) -> str:
    if r is None:
        return ""
    if r.get("status") == "ok":
        return _gib(r.get("peak_mem_bytes")) if r.get("peak_mem_bytes") is not None else "-"
    return _STATUS_SHORT.get(r.get("status"), r.get("status") or "?")


def memory_section(xrecs, *, head: str) -> list:
    """Markdown lines: peak memory (GiB) per pattern and length, one column per backend; [] if no record
    of this direction has a peak (CPU runs)."""
    if not any(r.get("peak_mem_bytes") is not None for r in xrecs):
        return []
    backends = sorted({r["backend"] for r in xrecs}, key=_backend_key)
    cell = {(r["pattern"], r["Lq"], r["backend"]): r for r in xrecs}
    rows = []
    for p in _pattern_order(xrecs):
        for L in sorted({r["Lq"] for r in xrecs if r["pattern"] == p}):
            rows.append([p, _len_label(L)] + [_mem_cell(cell.get((p, L, b))) for b in backends])
    return [f"### Peak memory ({head})", "",
            "Peak CUDA memory of a steady-state call, in GiB (`torch.cuda.max_memory_allocated` after "
            "`reset_peak_memory_stats`; the inputs, and for fwd+bwd the gradients, are included); OOM: the "
            "call ran out of memory.", "",
            _md_table(["pattern", "L"] + backends, rows), ""]


def plot_memory_vs_length(recs, path: Path, *, pattern: str, direction: str, device: str,
                          shape: Optional[str] = None) -> bool:
    """Peak memory (GiB) vs length, one line per backend (log2 x; log y when it spans a decade), OOMs
    marked at the top. A pattern of a single length gets one bar per backend. False if nothing to plot."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ok = [r for r in recs if r.get("status") == "ok" and r.get("peak_mem_bytes") is not None]
    if not ok:
        return False
    shape = shape or _shape_text(ok[0])
    title = f"{pattern} — peak memory, {DIRECTION_LABELS.get(direction, direction)}\n{device}; {shape}"
    lengths = sorted({r["Lq"] for r in recs if r.get("status") in ("ok", "oom")})
    by_backend = defaultdict(list)
    for r in ok:
        by_backend[r["backend"]].append(r)
    names = sorted(by_backend, key=_backend_key)
    if len(lengths) == 1:
        rows = [min(by_backend[b], key=lambda r: r["peak_mem_bytes"]) for b in names]
        fig, ax = _figure(max(5.5, 1.1 * len(rows) + 2.5), 5.0)
        vals = [r["peak_mem_bytes"] / GIB for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))], width=0.6)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{_gib(v * GIB)} GiB", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_xlabel(f"backend (L = {_len_label(lengths[0])} tokens, the pattern's fixed size)")
        ax.set_ylim(0, max(vals) * 1.2)
        ax.set_ylabel("peak memory allocated (GiB)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.35)
        fig.tight_layout()
        fig.savefig(path)
        return True
    fig, ax = _figure()
    markers = "osD^v<>ph*"
    lo = min(r["peak_mem_bytes"] for r in ok) / GIB
    hi = max(r["peak_mem_bytes"] for r in ok) / GIB
    log_y = lo > 0 and hi / lo > 10
    ooms = [r for r in recs if r.get("status") == "oom"]
    for i, b in enumerate(names):
        rs = sorted(by_backend[b], key=lambda r: r["Lq"])
        ax.plot([r["Lq"] for r in rs], [r["peak_mem_bytes"] / GIB for r in rs], marker=markers[i % len(markers)],
                linewidth=1.8, markersize=6, label=b, color=f"C{i}")
        bo = sorted({r["Lq"] for r in ooms if r["backend"] == b})
        if bo:
            ax.plot(bo, [hi * (1.6 if log_y else 1.08)] * len(bo), linestyle="none", marker="X", markersize=9,
                    color=f"C{i}")
    gpu = next((r.get("gpu_memory_bytes") for r in recs if r.get("gpu_memory_bytes")), None)
    if gpu and gpu / GIB <= hi * 4:
        ax.axhline(gpu / GIB, color="0.3", linestyle="--", linewidth=1, label=f"GPU memory ({gpu / GIB:.0f} GiB)")
    if ooms:
        ax.plot([], [], linestyle="none", marker="X", color="0.3", label="out of memory (OOM)")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
        _decade_ylim(ax)
    else:
        ax.set_ylim(0, ax.get_ylim()[1])
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(lengths, [_len_label(L) for L in lengths])
    ax.set_xlabel("sequence length L (tokens, log2 scale)")
    ax.set_ylabel("peak memory allocated (GiB" + (", log scale)" if log_y else ")"))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------------------------------
# one direction of one shape group
# --------------------------------------------------------------------------------------------------
def _direction_section(xrecs, out_dir: Path, *, direction: str, dev: str, devices: list, prefix: str, gslug: str,
                       head: str, have_mpl: bool, shape: str):
    """Markdown lines and PNG names of the tables and plots of ``xrecs`` (one direction, one shape group)."""
    lines, pngs = [], []
    dlabel = head
    lines += [f"## {dlabel}" + (f" — {dev}" if len(devices) > 1 else ""), ""]
    dense_recs = [r for r in xrecs if r.get("pattern_kind") == "full"]
    best_frac = {}
    for p in _pattern_order(xrecs):
        precs = [r for r in xrecs if r["pattern"] == p]
        backends = sorted({r["backend"] for r in precs}, key=_backend_key)
        lengths = sorted({r["Lq"] for r in precs})
        cell = {(r["Lq"], r["backend"]): r for r in precs}
        show_b = len({r.get("B") for r in precs}) > 1
        lines += [f"### {p} ({dlabel})", ""]
        rows = []
        for L in lengths:
            dens = next((r.get("density") for r in precs if r["Lq"] == L and r.get("density") is not None), None)
            bcol = [str(next(r.get("B") for r in precs if r["Lq"] == L))] if show_b else []
            rows.append([_len_label(L)] + bcol + [f"{dens:.4g}" if dens is not None else "-"]
                        + [_cell(cell.get((L, b))) for b in backends])
        lines += ["Median ms per call / effective TFLOP/s:", "",
                  _md_table(["L"] + (["B"] if show_b else []) + ["density"] + backends, rows), ""]
        frows = []
        for L in lengths:
            fr = []
            for b in backends:
                r = cell.get((L, b))
                fr.append(f"{r['frac_ideal']:.2f}" if r and r.get("frac_ideal") is not None else "-")
                if r and r.get("frac_ideal") is not None:
                    cur = best_frac.setdefault(p, {}).get(L)
                    if cur is None or r["frac_ideal"] > cur[0]:
                        best_frac[p][L] = (r["frac_ideal"], b)
            base = next((r for r in precs if r["Lq"] == L and r.get("dense_backend")), None)
            frows.append([_len_label(L)] + fr + [f"{base['dense_backend']} {_ms(base['dense_ms'])} ms" if base
                                                 else "none measured"])
        lines += ["Fraction of ideal:", "", _md_table(["L"] + backends + ["dense baseline"], frows), ""]
        if have_mpl:
            name = f"{prefix}time_{_slug(p)}{gslug}_{direction}.png"
            try:
                if plot_time_vs_length(precs, dense_recs, out_dir / name, pattern=p, direction=direction,
                                       device=dev, shape=shape):
                    lines += [f"![{p}, {dlabel}: time vs length]({name})", ""]
                    pngs.append(name)
            except Exception as e:  # noqa: BLE001 - a broken plot must not lose the tables
                lines += [f"(plot failed: {type(e).__name__}: {e})", ""]

    # attnzoo's own kernel (and its variants, triton[NAME]) against FlexAttention on the same pattern
    vs = {}
    for r in xrecs:
        if r.get("status") == "ok" and (r["backend"] == "flex" or _is_triton(r["backend"])):
            vs.setdefault((r["pattern"], r["Lq"]), {})[r["backend"]] = r["median_ms"]
    labels = sorted({b for v in vs.values() if "flex" in v for b in v if b != "flex"}, key=_backend_key)
    if labels:
        lens_v = sorted({L for (_, L), v in vs.items() if "flex" in v and len(v) > 1})
        rows = []
        for p in _pattern_order(xrecs):
            for b in labels:
                cells = [f"{vs[(p, L)]['flex'] / vs[(p, L)][b]:.2f}×" if b in vs.get((p, L), {}) and
                         "flex" in vs[(p, L)] else "-" for L in lens_v]
                if any(c != "-" for c in cells):
                    rows.append([p if b == "triton" else f"{p} ({b})"] + cells)
        lines += [f"### attnzoo triton vs compiled FlexAttention ({dlabel})", "",
                  "Speedup = FlexAttention time / triton time on the same pattern and shape (>1: triton "
                  "is faster)" + ("; triton[NAME] rows are the run's --variant configs." if len(labels) > 1 else "."),
                  "", _md_table(["pattern"] + [f"L={_len_label(L)}" for L in lens_v], rows), ""]

    # best fraction of ideal per pattern
    lens_all = sorted({L for p in best_frac for L in best_frac[p]})
    if best_frac:
        lines += [f"### Fraction of ideal, best backend ({dlabel})", ""]
        rows = []
        for p in _pattern_order(xrecs):
            if p == "full" or p not in best_frac:
                continue
            rows.append([p] + [f"{best_frac[p][L][0]:.2f} ({best_frac[p][L][1]})" if L in best_frac[p] else "-"
                               for L in lens_all])
        if rows:
            lines += [_md_table(["pattern"] + [f"L={_len_label(L)}" for L in lens_all], rows), ""]
        if have_mpl:
            name = f"{prefix}frac_ideal{gslug}_{direction}.png"
            try:
                if plot_frac_ideal(best_frac, out_dir / name, direction=direction, device=dev, shape=shape):
                    lines += [f"![fraction of ideal, {dlabel}]({name})", ""]
                    pngs.append(name)
            except Exception as e:  # noqa: BLE001
                lines += [f"(plot failed: {type(e).__name__}: {e})", ""]

    # peak memory: a table, and a plot per pattern
    mem = memory_section(xrecs, head=dlabel)
    if mem:
        lines += mem
        if have_mpl:
            for p in _pattern_order(xrecs):
                precs = [r for r in xrecs if r["pattern"] == p]
                name = f"{prefix}mem_{_slug(p)}{gslug}_{direction}.png"
                try:
                    if plot_memory_vs_length(precs, out_dir / name, pattern=p, direction=direction, device=dev,
                                             shape=shape):
                        lines += [f"![{p}, {dlabel}: peak memory vs length]({name})", ""]
                        pngs.append(name)
                except Exception as e:  # noqa: BLE001
                    lines += [f"(plot failed: {type(e).__name__}: {e})", ""]
    return lines, pngs


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------
def _cell(r) -> str:
    if r is None:
        return ""
    if r.get("status") == "ok":
        return f"{_ms(r['median_ms'])} ms / {_tf(r.get('tflops'))} TF/s"
    return _STATUS_SHORT.get(r.get("status"), r.get("status") or "?")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def gpu_state_section(drecs) -> list:
    """Markdown lines: each measured case's SM clock, board power and power-capped share over its timed calls
    (records from `timing.time_fn` with NVML), or nothing where no record has them."""
    recs = [r for r in drecs if r.get("status") == "ok" and r.get("sm_clock_mhz") is not None]
    if not recs:
        return []
    rows = [[r["pattern"], _len_label(r["Lq"]), DIRECTION_LABELS.get(r["direction"], r["direction"]), r["backend"],
             _ms(r.get("median_ms")), f"{r['sm_clock_mhz']:.0f}",
             "-" if r.get("power_w") is None else f"{r['power_w']:.0f}", _pct(r.get("power_cap_share")),
             _pct(r.get("thermal_share"))]
            for r in sorted(recs, key=lambda r: (r["direction"], r["Lq"], r["pattern"], _backend_key(r["backend"])))]
    clocks = [r["sm_clock_mhz"] for r in recs]
    return ["## GPU clock and power during the timed calls", "",
            f"Mean SM clock over each case's timed calls (NVML, sampled every 10 ms), mean board power (its "
            f"instantaneous samples, else the energy counter; only over windows of at least "
            f"{MIN_POWER_WINDOW_S:g} s), and the share of samples with the power cap or a thermal slowdown active. Clocks here span "
            f"{min(clocks):.0f}-{max(clocks):.0f} MHz. A case held at its power cap runs at a lower clock than the "
            f"same calls in a short burst, and a kernel that draws more power is slowed more than a slower peer.", "",
            _md_table(["pattern", "L", "direction", "backend", "ms", "MHz", "W", "power-capped", "thermal"], rows),
            ""]


def write_report(results_jsonl, out_dir, *, plots: bool = True) -> Path:
    """Write ``report.md`` (and PNG plots when matplotlib is installed) into ``out_dir``; return its path."""
    results_jsonl = Path(results_jsonl)
    if results_jsonl.is_dir():
        results_jsonl = results_jsonl / RESULTS_FILE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not results_jsonl.exists():
        raise FileNotFoundError(f"no results file at {results_jsonl}; run `attnzoo bench --out DIR` first")
    raw = load_records(results_jsonl)
    recs = prepare(raw)

    have_mpl, mpl_note = False, ""
    if plots:
        try:
            import matplotlib  # noqa: F401
            have_mpl = True
        except Exception as e:  # noqa: BLE001
            mpl_note = (f"Plots skipped: matplotlib is not importable ({type(e).__name__}: {e}). "
                        "Install it (`pip install 'attnzoo[bench]'`) and run `attnzoo bench report --out DIR`.")
    else:
        mpl_note = "Plots not requested."

    lines = ["# attnzoo speed benchmark", ""]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines += [f"Generated {now} from `{results_jsonl.name}` ({len(raw)} records, {len(recs)} cases).", ""]
    lines += ["How to read: times are medians of the timed calls (compilation excluded); TF/s are *effective* "
              "TFLOP/s on the pairs each pattern keeps (forward FLOPs = 4·B·Hq·D·visible pairs, fwd+bwd = 3.5× "
              "forward). *Fraction of ideal* = (dense time / time) / (dense FLOPs / FLOPs), with the dense time "
              "the fastest full-attention measurement of the same shape and direction: 1.0 means the pattern "
              "saves time in proportion to the FLOPs it skips. See BENCHMARK_PROTOCOL.md.", ""]
    if not recs:
        lines += ["No records yet."]
    pngs = []
    devices = list(dict.fromkeys(r.get("device_name", "?") for r in recs))
    for dev in devices:
        drecs = [r for r in recs if r.get("device_name", "?") == dev]
        prefix = "" if len(devices) == 1 else _slug(dev)[:40] + "_"
        r0 = drecs[0]
        if len(devices) > 1:
            lines += [f"## Device: {dev}", ""]
        env_bits = [f"**device** {dev}", f"torch {r0.get('torch_version')}", f"triton {r0.get('triton_version')}",
                    f"attnzoo {r0.get('attnzoo_version')}"]
        if r0.get("cuda_version"):
            env_bits.append(f"CUDA {r0.get('cuda_version')}")
        if r0.get("device") == "cpu":
            env_bits.append(f"{r0.get('cpu_threads')} threads")
        stamps = sorted(r.get("timestamp", "") for r in drecs if r.get("timestamp"))
        if stamps:
            env_bits.append(f"measured {stamps[0]} … {stamps[-1]}")
        lines += [" · ".join(env_bits), ""]
        shapes = sorted({_shape_text(r) for r in drecs})
        lines += ["Shapes: " + "; ".join(shapes), ""]
        counts = defaultdict(int)
        for r in drecs:
            counts[r.get("status", "?")] += 1
        lines += ["Status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]

        # patterns
        lines += ["### Patterns", ""]
        seen = {}
        for r in drecs:
            seen.setdefault(r["pattern"], r)
        prow = []
        for p in _pattern_order(drecs):
            r = seen[p]
            dens = sorted({(rr["Lq"], rr.get("density")) for rr in drecs if rr["pattern"] == p and rr.get("density") is not None})
            dtxt = ", ".join(f"{_len_label(L)}: {d:.4g}" for L, d in dens)
            prow.append([p, r.get("pattern_description") or "", f"`{r.get('pattern_repr')}`", dtxt])
        lines += [_md_table(["pattern", "description", "attnzoo pattern", "density by length"], prow,
                            numeric=False), ""]

        groups = _shape_groups(drecs)
        for direction in ("fwd", "fwdbwd"):
            for gkey, grecs in groups:
                xrecs = [r for r in grecs if r["direction"] == direction]
                if not xrecs:
                    continue
                gtag = _group_text(grecs, short=True) if len(groups) > 1 else ""
                gslug = ("_" + _slug(gtag)) if gtag else ""
                head = f"{DIRECTION_LABELS.get(direction, direction)}" + (f", {gtag}" if gtag else "")
                sec, sec_pngs = _direction_section(xrecs, out_dir, direction=direction, dev=dev, devices=devices,
                                                   prefix=prefix, gslug=gslug, head=head, have_mpl=have_mpl,
                                                   shape=_group_text(xrecs))
                lines += sec
                pngs += sec_pngs

        lines += gpu_state_section(drecs)
        bad = [r for r in drecs if r.get("status") != "ok"]
        if bad:
            lines += ["## Not measured", ""]
            rows = [[r["pattern"], _len_label(r["Lq"]), DIRECTION_LABELS.get(r["direction"], r["direction"]), r["backend"],
                     r.get("status"), (r.get("message") or "").replace("\n", " ")[:300]] for r in bad]
            lines += [_md_table(["pattern", "L", "direction", "backend", "status", "why"], rows, numeric=False), ""]
        notes = sorted({r.get("note") for r in drecs if r.get("note")})
        cfg = sorted({r.get("compile_config") for r in drecs if r.get("compile_config")})
        if notes or cfg:
            lines += ["## Notes", ""] + [f"- {n}" for n in notes + cfg] + [""]

    if mpl_note:
        lines += ["## Plots", "", mpl_note, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
