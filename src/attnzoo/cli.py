"""The ``attnzoo`` command.

    attnzoo list                                   patterns and backends, and what each backend supports
    attnzoo bench [--out DIR] [--suite auto|cpu|cuda|flash] [--pattern P] [--backend B] [--lengths 1024,2048]
                  [--direction fwd|fwdbwd] [--reps N] ...
                                                   run the speed suite (resumable), then write the report
    attnzoo bench report --out DIR                 only (re)write DIR/report.md and the plots
    attnzoo bench recall [--out DIR] [--grid cpu|full] [--mixer M ...] [--d-model 64,128] [--lr 1e-3,3e-3]
                         [--tasks 64x4,256x16] [--steps N] [--seed S] ...
                                                   train TinyLMs on MQAR (resumable), then write the recall report
    attnzoo bench niah [--out DIR] [--grid cpu|full] [--steps N] [--train-len L] [--lengths 256,512]
                       [--depths 0,0.5,1] [--methods dense,window:64] [--seed S] [--device D] ...
                                                   needle-in-a-haystack: train one TinyLM, swap sparse patterns in at
                                                   inference, accuracy per length x depth (resumable), then the report
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Optional, Sequence


# --------------------------------------------------------------------------------------------------
# attnzoo list
# --------------------------------------------------------------------------------------------------
def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def pattern_rows() -> list:
    import attnzoo.patterns as P
    rows = []
    skip = {"Pattern", "BlockLayout", "Union", "Intersection", "PerHead"}
    for name in P.__all__:
        if name in skip:
            continue
        obj = getattr(P, name, None)
        if isinstance(obj, type):
            desc = _first_line(obj)
            if desc.startswith(f"``{name}(") or not desc:  # a signature, not a sentence: use the module's line
                desc = _first_line(sys.modules.get(obj.__module__)) or desc
            rows.append([name, desc])
    algebra = [("a | b", "Union", "visible where either pattern is visible"),
               ("a & b", "Intersection", "visible where both patterns are visible"),
               ("PerHead([...])", "PerHead", "one pattern per query head")]
    for label, name, fallback in algebra:
        obj = getattr(P, name, None)
        if obj is not None:
            rows.append([label, _first_line(obj) or fallback])
    return rows


def backend_rows() -> tuple:
    """(headers, rows, note): from `attnzoo.backends.capabilities()`, else from what exists."""
    try:
        import attnzoo.backends as B
    except Exception as e:  # noqa: BLE001
        return ["backend"], [], f"(backends unavailable: {type(e).__name__}: {e})"
    caps = getattr(B, "capabilities", None)
    if callable(caps):
        rows = []
        for c in caps():
            rows.append([str(c.get("backend", "?")), str(c.get("patterns", "")), str(c.get("devices", "")),
                         str(c.get("dtypes", "")) if "dtypes" in c else "",
                         str(c.get("lse", "")), str(c.get("grad", "")), str(c.get("description", ""))])
        headers = ["backend", "patterns", "devices", "dtypes", "lse", "grad", "description"]
        if all(r[3] == "" for r in rows):  # no dtypes column given
            headers.pop(3)
            rows = [r[:3] + r[4:] for r in rows]
        return headers, rows, ""
    registry = getattr(B, "BACKENDS", {}) or {}
    rows = [[name, getattr(b, "patterns", "") or "?", ", ".join(getattr(b, "devices", ())) or "?",
             "yes" if getattr(b, "supports_lse", False) else "?", "?", getattr(b, "description", "")]
            for name, b in registry.items()]
    return (["backend", "patterns", "devices", "lse", "grad", "description"], rows,
            "(attnzoo.backends.capabilities() is missing: listed from BACKENDS)")


def cmd_list(args, parser) -> int:
    from .bench.speed import print_table
    print_table("Patterns", ["pattern", "description"], pattern_rows())
    print()
    headers, rows, note = backend_rows()
    print_table("Backends", headers, rows)
    if note:
        print(note)
    return 0


# --------------------------------------------------------------------------------------------------
# attnzoo bench
# --------------------------------------------------------------------------------------------------
def parse_lengths(text: str) -> list:
    """'1024,2048', '1K,4k', '1K..64K' (powers of two between) -> sorted ints."""
    def one(tok: str) -> int:
        t = tok.strip().lower()
        mult = 1
        if t.endswith("k"):
            t, mult = t[:-1], 1024
        try:
            n = int(t) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{tok!r} is not a length; give integers like 1024,2048 or 1K..64K") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {tok!r}")
        return n
    out = set()
    for part in str(text).split(","):
        if not part.strip():
            continue
        if ".." in part:
            a, b = (one(x) for x in part.split("..", 1))
            if a > b:
                raise argparse.ArgumentTypeError(f"range {part!r} is empty")
            n = a
            while n <= b:
                out.add(n)
                n *= 2
        else:
            out.add(one(part))
    if not out:
        raise argparse.ArgumentTypeError("no length given")
    return sorted(out)


def _report_only(action: str, out, results_file: str, write_report) -> int:
    """`attnzoo bench ACTION --report-only`: rewrite the report from the recorded results."""
    if not (out / results_file).exists():
        print(f"attnzoo bench {action}: error: no {results_file} in {out}; run `attnzoo bench {action} --out {out}` "
              "first", file=sys.stderr)
        return 1
    print(f"report: {write_report(out / results_file, out)}")
    return 0


def _set_threads(threads) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _int_at_least(lo: int):
    def conv(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return conv


def _positive_int(name):
    return _int_at_least(1)


def _nonneg_int(name):
    return _int_at_least(0)


def _positive_float(name):
    def conv(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return x
    return conv


_DIRECTION_CHOICES = {"fwd": ["fwd"], "fwdbwd": ["fwdbwd"], "fwd+bwd": ["fwdbwd"], "both": ["fwd", "fwdbwd"]}


def _float_list(name):
    def conv(text):
        out = []
        for tok in str(text).split(","):
            if not tok.strip():
                continue
            try:
                x = float(tok)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{tok!r} is not a number") from None
            if not x > 0:
                raise argparse.ArgumentTypeError(f"must be > 0, got {tok!r}")
            out.append(x)
        if not out:
            raise argparse.ArgumentTypeError("no value given")
        return out
    return conv


def _int_list(name):
    def conv(text):
        out = []
        for tok in str(text).split(","):
            if not tok.strip():
                continue
            try:
                n = int(tok)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{tok!r} is not an integer") from None
            if n < 1:
                raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
            out.append(n)
        if not out:
            raise argparse.ArgumentTypeError("no value given")
        return out
    return conv


def _depth_list(text: str) -> list:
    out = []
    for tok in str(text).split(","):
        if not tok.strip():
            continue
        try:
            d = float(tok)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{tok!r} is not a number") from None
        if not 0.0 <= d <= 1.0:
            raise argparse.ArgumentTypeError(f"depth must be in [0, 1], got {d}")
        out.append(d)
    if not out:
        raise argparse.ArgumentTypeError("no depth given")
    return out


def parse_tasks(text: str) -> list:
    """'64x4,256x16' -> [(64, 4), (256, 16)]: MQAR (sequence length, kv pairs)."""
    out = []
    for tok in str(text).split(","):
        if not tok.strip():
            continue
        parts = tok.lower().replace(":", "x").split("x")
        try:
            L, K = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{tok!r} is not a task; give LxK pairs like 64x4,256x16") from None
        if L < 1 or K < 1:
            raise argparse.ArgumentTypeError(f"task {tok!r}: L and K must be >= 1")
        out.append((L, K))
    if not out:
        raise argparse.ArgumentTypeError("no task given")
    return out


def _split_mixers(values) -> list:
    """--mixer values: repeatable, comma-separated."""
    out = []
    for v in values or []:
        out += [m.strip() for m in str(v).split(",") if m.strip()]
    return out


_RECALL_ONLY = ("mixer", "grid", "d_model", "lr", "tasks", "steps", "batch_size", "n_train", "n_test", "vocab",
                "eval_every", "no_early_stop", "device", "report_only", "threads", "speed_len")


def cmd_recall(args, parser) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .bench.recall import RESULTS_FILE, SUMMARY_COLUMNS, get_grid, plan_cells, run_grid, summary_rows, \
        write_recall_report
    from .bench.speed import print_table

    out = Path(args.out)
    if args.report_only:
        return _report_only("recall", out, RESULTS_FILE, write_recall_report)
    import torch
    _set_threads(args.threads)
    grid = get_grid(args.grid or "cpu")
    changes = dict(seed=args.seed)
    if args.mixer:
        changes["mixers"] = tuple(_split_mixers(args.mixer))
    for field_name, value in (("d_models", args.d_model), ("lrs", args.lr), ("tasks", args.tasks)):
        if value:
            changes[field_name] = tuple(dict.fromkeys(value))
    for field_name, value in (("steps", args.steps), ("batch_size", args.batch_size), ("n_train", args.n_train),
                              ("n_test", args.n_test), ("vocab_size", args.vocab), ("eval_every", args.eval_every),
                              ("speed_len", args.speed_len)):
        if value is not None:
            changes[field_name] = value
    if args.no_early_stop:
        changes["early_stop_acc"] = None
    grid = replace(grid, **changes)
    try:
        cells = plan_cells(grid)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(f"recall grid {grid.name}: V={grid.vocab_size}, {grid.n_layers} layers, {grid.n_train} train / "
              f"{grid.n_test} test examples, up to {grid.steps} steps")
        for c in cells:
            print(f"  {c.label()} batch={grid.batch_for(c.seq_len)}")
        print(f"{len(cells)} cells")
        return 0
    if not args.quiet:
        print(f"attnzoo bench recall: grid {grid.name} (V={grid.vocab_size}, {grid.n_layers} layers, up to "
              f"{grid.steps} steps, {torch.get_num_threads()} CPU threads) -> {out / RESULTS_FILE}; {len(cells)} cells",
              flush=True)
    try:
        records = run_grid(grid, out, device=args.device, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the cells so far are in {out / RESULTS_FILE}; run the same command again to resume",
              file=sys.stderr)
        return 130
    if not args.quiet:
        print()
        print_table("Recall summary (best lr per cell group)", list(SUMMARY_COLUMNS), summary_rows(records))
    if not args.no_report:
        print(f"report: {write_recall_report(out / RESULTS_FILE, out)}")
    return 0


_NIAH_ONLY = ("train_len", "depths", "methods", "niah_tasks")
# recall options that mean nothing to niah
_NOT_NIAH = ("mixer", "tasks", "lr", "no_early_stop", "speed_len")


def _split_list(values) -> list:
    """Repeated and comma-separated names; a piece that is only a number continues the previous name
    (``streaming:4,64`` is one method, ``dilated:32,4`` too)."""
    out = []
    for v in values or []:
        for m in (m.strip() for m in str(v).split(",")):
            if not m:
                continue
            if out and m.replace(".", "", 1).isdigit():
                out[-1] += "," + m
            else:
                out.append(m)
    return out


def cmd_niah(args, parser) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .bench.niah import RESULTS_FILE, SUMMARY_COLUMNS, get_grid, plan_cells, run_grid, summary_rows, \
        write_niah_report
    from .bench.speed import print_table

    given = [f"--{n.replace('_', '-')}" for n in _NOT_NIAH if getattr(args, n, None) not in (None, False)]
    if given:
        parser.error(f"{', '.join(given)} do not apply to `attnzoo bench niah`")
    out = Path(args.out)
    if args.report_only:
        return _report_only("niah", out, RESULTS_FILE, write_niah_report)
    import torch
    _set_threads(args.threads)
    grid = get_grid(args.grid or "cpu")
    changes = dict(seed=args.seed)
    if args.methods:
        changes["methods"] = tuple(dict.fromkeys(_split_list(args.methods)))
    if args.niah_tasks:
        changes["tasks"] = tuple(dict.fromkeys(_split_list(args.niah_tasks)))
    if args.lengths:
        changes["lengths"] = tuple(dict.fromkeys(int(x) for x in args.lengths))
    if args.depths:
        changes["depths"] = tuple(dict.fromkeys(float(x) for x in args.depths))
    if args.d_model:
        changes["d_model"] = args.d_model[0]
    for field_name, value in (("steps", args.steps), ("train_len", args.train_len), ("batch_size", args.batch_size),
                              ("n_train", args.n_train), ("n_test", args.n_test), ("vocab_size", args.vocab),
                              ("eval_every", args.eval_every)):
        if value is not None:
            changes[field_name] = value
    grid = replace(grid, **changes)
    try:
        cells = plan_cells(grid)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(f"niah grid {grid.name}: train at L={grid.train_len}, V={grid.vocab_size}, d_model {grid.d_model}, "
              f"{grid.n_layers} layers, up to {grid.steps} steps; {grid.n_test} test examples per cell")
        for c in cells:
            print(f"  {c.label()}")
        print(f"{len(cells)} cells")
        return 0
    if not args.quiet:
        print(f"attnzoo bench niah: grid {grid.name} (train L={grid.train_len}, up to {grid.steps} steps, "
              f"{torch.get_num_threads()} CPU threads) -> {out / RESULTS_FILE}; {len(cells)} cells", flush=True)
    try:
        records = run_grid(grid, out, device=args.device, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the cells so far are in {out / RESULTS_FILE} (and the model, once trained); run the "
              "same command again to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print()
        print_table("Needle-in-a-haystack summary", list(SUMMARY_COLUMNS), summary_rows(records))
    if not args.no_report:
        print(f"report: {write_niah_report(out / RESULTS_FILE, out)}")
    return 0


def cmd_bench(args, parser) -> int:
    from pathlib import Path

    if args.action in ("recall", "niah", "report") and args.triton_override is not None:
        parser.error("--triton-override applies to the speed benchmark (`attnzoo bench run`) only")
    if args.action in ("recall", "niah", "report") and args.variant:
        parser.error("--variant applies to the speed benchmark (`attnzoo bench run`) only")
    if args.action == "recall":
        given = [f"--{n.replace('_', '-')}" for n in _NIAH_ONLY if getattr(args, n, None) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} only apply to `attnzoo bench niah`")
        return cmd_recall(args, parser)
    if args.action == "niah":
        return cmd_niah(args, parser)
    given = [f"--{n.replace('_', '-')}" for n in _RECALL_ONLY + _NIAH_ONLY if getattr(args, n, None) not in (None, False)]
    if given:
        parser.error(f"{', '.join(given)} only apply to `attnzoo bench recall` or `attnzoo bench niah`")

    from .bench.report import write_report
    from .bench.speed import (RESULTS_FILE, SUMMARY_COLUMNS, describe_plan, get_suite, parse_variant, plan,
                              print_table, run_suite, summary_rows)

    out = Path(args.out)
    if args.action == "report":
        if not (out / RESULTS_FILE).exists():
            print(f"attnzoo bench report: error: no {RESULTS_FILE} in {out}; run `attnzoo bench --out {out}` first",
                  file=sys.stderr)
            return 1
        path = write_report(out / RESULTS_FILE, out)
        print(f"report: {path}")
        return 0

    if args.triton_override is not None:
        try:
            from .backends.triton import tuning
            tuning.parse_overrides(args.triton_override)
        except ImportError as e:
            parser.error(f"--triton-override needs attnzoo's Triton backend: {e}")
        except ValueError as e:
            parser.error(f"--triton-override: {e}")
        os.environ["ATTNZOO_TRITON_OVERRIDE"] = args.triton_override
    variants = []
    for text in args.variant or ():
        try:
            variants.append(parse_variant(text))
        except ImportError as e:
            parser.error(f"--variant needs attnzoo's Triton backend: {e}")
        except ValueError as e:
            parser.error(f"--variant: {e}")
    try:
        suite = get_suite(args.suite, full_grid=args.full_grid, require_device=not args.dry_run)
        directions = _DIRECTION_CHOICES[args.direction] if args.direction else None
        cases = plan(suite, patterns=args.pattern, backends=args.backend, lengths=args.lengths,
                     directions=directions, no_skip=args.no_skip, baseline=not args.no_baseline,
                     variants=variants)
    except ValueError as e:
        parser.error(str(e))
    if not cases:
        parser.error("the filters leave no case to run (check --pattern, --backend, --lengths, --direction; "
                     "fixed-size patterns run only at their own length)")
    shape = (f"{suite.dtype}, " + (f"B·L = {suite.tokens // 1024}K tokens" if suite.tokens else f"B={suite.B}")
             + f", Hq={suite.Hq}, Hkv={suite.Hkv}, D={'/'.join(str(d) for d in suite.dims())}")
    if args.dry_run:
        print(f"suite {suite.name} on {suite.device}: {shape}")
        print(describe_plan(cases))
        return 0

    n_run = sum(1 for c in cases if not c.skip)
    if not args.quiet:
        print(f"attnzoo bench: suite {suite.name} ({shape}) -> {out / RESULTS_FILE}; {len(cases)} cases ({n_run} to measure, "
              f"{len(cases) - n_run} planned skips)", flush=True)
    try:
        records = run_suite(cases, out, suite=suite, reps=args.reps, warmup=args.warmup, max_time_s=args.max_time_s,
                            seed=args.seed, progress=not args.quiet, flush_l2=not args.no_flush,
                            sustain_s=args.sustain_s)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the measurements so far are in {out / RESULTS_FILE}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print()
        print_table("Summary", list(SUMMARY_COLUMNS), summary_rows(records))
    if not args.no_report:
        path = write_report(out / RESULTS_FILE, out)
        print(f"report: {path}")
    return 0


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="attnzoo: attention patterns, backends, benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="{list,bench}")

    p_list = sub.add_parser("list", help="list the patterns and the backends (and what each supports)")
    p_list.set_defaults(func=cmd_list, subparser=p_list)

    p_bench = sub.add_parser(
        "bench", help="run the speed suite and write the report (`bench report` only rewrites the report)",
        description="Run the speed suite (appending to DIR/results.jsonl, skipping cases already recorded ok), "
                    "then write DIR/report.md and plots. `attnzoo bench report --out DIR` only rewrites the report.")
    p_bench.add_argument("action", nargs="?", choices=("run", "report", "recall", "niah"), default="run",
                         help="run (default): measure then report; report: only rewrite the report; "
                              "recall: the MQAR benchmark (train TinyLMs, write report_recall.md); "
                              "niah: needle in a haystack at length with sparse patterns (report_niah.md)")
    p_bench.add_argument("--out", default="bench-results", metavar="DIR",
                         help="output folder for results.jsonl, report.md and plots (default: %(default)s)")
    p_bench.add_argument("--suite", choices=("auto", "cpu", "cuda", "flash"), default="auto",
                         help="cuda (long-context grid) when a GPU is available, else cpu; flash = the "
                              "FlashAttention grid, B·L = 16K tokens, 16 heads, D 64/128 (default: %(default)s)")
    p_bench.add_argument("--pattern", action="append", metavar="P",
                         help="only these patterns (repeat or comma-separate; wildcards ok). The dense "
                              "baseline is kept unless --no-baseline")
    p_bench.add_argument("--backend", action="append", metavar="B",
                         help="only these backends (repeat or comma-separate; 'sdpa' matches every sdpa-*, "
                              "'flex' matches flex-eager; peers: flash-attn, xformers, natten)")
    p_bench.add_argument("--lengths", type=parse_lengths, metavar="L,...",
                         help="sequence lengths, e.g. 1024,2048 or 1K..64K (replaces the suite's lengths)")
    p_bench.add_argument("--direction", choices=tuple(_DIRECTION_CHOICES), default=None,
                         help="fwd, fwdbwd (= fwd+bwd) or both (default: the suite's plan)")
    p_bench.add_argument("--reps", type=_positive_int("--reps"), default=None, metavar="N",
                         help="timed repetitions per case (default: 5 on cpu, 10 on cuda)")
    p_bench.add_argument("--warmup", type=_nonneg_int("--warmup"), default=None, metavar="N",
                         help="untimed calls after the first (compilation) call (default: 0 on cpu, 2 on cuda)")
    p_bench.add_argument("--max-time-s", type=_positive_float("--max-time-s"), default=None, metavar="S",
                         help="cap the timed repetitions of one case at about S seconds (at least 3 reps)")
    p_bench.add_argument("--sustain-s", type=_positive_float("--sustain-s"), default=None, metavar="S",
                         help="cuda: S seconds of untimed calls before each case's timed ones, so that they run at "
                              "the clock the GPU holds under a long load (its power cap), not a short burst's "
                              "(recorded as a separate measurement)")
    p_bench.add_argument("--triton-override", default=None, metavar="JSON",
                         help="settings merged over attnzoo's Triton kernel configs for this run, e.g. "
                              "'{\"bwd@wide\": {\"GLUON_BWD\": {\"TAIL_ORDER\": true}}}' (keys: fwd / bwd, "
                              "optionally @dense / @wide / @local / @nbhd; sets ATTNZOO_TRITON_OVERRIDE, which each "
                              "record's environment keeps). Use a fresh --out: recorded cases are not run again")
    p_bench.add_argument("--variant", action="append", metavar="NAME=JSON",
                         help="also time attnzoo's triton backend with JSON's settings (the --triton-override format) "
                              "merged over its kernel configs, as the backend triton[NAME], right after each triton "
                              "case of the same run (repeatable), e.g. "
                              "'tail={\"bwd\": {\"GLUON_BWD\": {\"TAIL_ORDER\": true}}}'")
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p_bench.add_argument("--full-grid", action="store_true",
                         help="cuda suite: every power of two from 1K to 64K instead of 4K, 16K, 64K")
    p_bench.add_argument("--no-skip", action="store_true", help="also run the cases the suite plans to skip")
    p_bench.add_argument("--no-baseline", action="store_true",
                         help="do not add the dense SDPA baseline when filtering by pattern or backend")
    p_bench.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache between CUDA reps")
    p_bench.add_argument("--no-report", action="store_true", help="do not write report.md after the run")
    p_bench.add_argument("--dry-run", action="store_true", help="print the planned cases and exit")
    p_bench.add_argument("--quiet", action="store_true", help="no progress output and no summary table")
    g = p_bench.add_argument_group(
        "recall (MQAR) options", "only with `attnzoo bench recall`; --out, --seed, --dry-run, --quiet and --no-report "
        "apply too. Results go to DIR/results_recall.jsonl (resumable), the report to DIR/report_recall.md")
    g.add_argument("--grid", choices=("cpu", "full"), default=None,
                   help="cpu (default): L=64, 4 kv pairs, d_model 64, V=2048, attention vs sliding_window:8, a few "
                        "minutes; full: the protocol's grid for a GPU (V=8192, 4 tasks x 4 widths x 4 lrs)")
    g.add_argument("--mixer", action="append", metavar="M",
                   help="token mixer specs (repeat or comma-separate), e.g. attention, sliding_window:8, "
                        "attention+sliding_window:32 (a hybrid, one spec per layer)")
    g.add_argument("--d-model", type=_int_list("--d-model"), metavar="D,...", help="model widths, e.g. 64,128")
    g.add_argument("--lr", type=_float_list("--lr"), metavar="LR,...", help="learning rates to sweep, e.g. 1e-3,3e-3")
    g.add_argument("--tasks", type=parse_tasks, metavar="LxK,...",
                   help="MQAR (sequence length x kv pairs) tasks, e.g. 64x4,256x16")
    g.add_argument("--steps", type=_positive_int("--steps"), default=None, metavar="N",
                   help="optimizer steps per cell (the most: training stops early at 0.99 test accuracy)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None, metavar="N",
                   help="examples per step (default: 128 on the cpu grid; 256/256/128/64 for L=64/128/256/512 on full)")
    g.add_argument("--n-train", type=_positive_int("--n-train"), default=None, metavar="N",
                   help="training examples per task")
    g.add_argument("--n-test", type=_positive_int("--n-test"), default=None, metavar="N",
                   help="test examples per task")
    g.add_argument("--vocab", type=_positive_int("--vocab"), default=None, metavar="V",
                   help="vocabulary size (the protocol: 8192)")
    g.add_argument("--eval-every", type=_positive_int("--eval-every"), default=None, metavar="N",
                   help="evaluate on the test set every N steps")
    g.add_argument("--no-early-stop", action="store_true", help="train every cell for all its steps")
    g.add_argument("--speed-len", type=_nonneg_int("--speed-len"), default=None, metavar="N",
                   help="also time each trained model's forward+backward on one sequence of N tokens, the speed "
                        "axis of the speed-vs-recall plot (cpu: 1024, full: 16384; 0: off)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--threads", type=_positive_int("--threads"), default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice); on a busy machine 1 is often faster")
    g.add_argument("--report-only", action="store_true", help="only rewrite DIR/report_recall.md (or report_niah.md)")
    n = p_bench.add_argument_group(
        "niah (needle in a haystack) options", "only with `attnzoo bench niah`; also --out, --grid, --steps, --lengths "
        "(test lengths), --seed, --device, --threads, --d-model, --batch-size, --n-train, --n-test (per cell), --vocab, "
        "--eval-every, --dry-run, --quiet, --no-report, --report-only. Results go to DIR/results_niah.jsonl "
        "(resumable; the trained model is DIR/niah_model_<key>.pt), the report to DIR/report_niah.md")
    n.add_argument("--train-len", type=_positive_int("--train-len"), default=None, metavar="L",
                   help="training sequence length (cpu: 256, full: 1024)")
    n.add_argument("--depths", type=_depth_list, default=None, metavar="D,...",
                   help="needle depths in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    n.add_argument("--methods", action="append", metavar="M",
                   help="methods (repeat or comma-separate): dense, window:W, streaming:S,W, chunked:C, power:W, "
                        "dilated:W,D; routers: topk:B:K, longheads:C:K, landmark:B:K, hip:B:K, vslash:B:V:S "
                        "(MInference vertical-slash), flexprefill:B:G[:T] (gamma, tau)")
    n.add_argument("--niah-tasks", action="append", metavar="T",
                   help="single and/or multikey (cpu default: single; full: both)")
    p_bench.set_defaults(func=cmd_bench, subparser=p_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # errors of a subcommand are reported through that subcommand's parser (its usage line is the useful one)
    return args.func(args, args.subparser)

if __name__ == "__main__":
    sys.exit(main())
