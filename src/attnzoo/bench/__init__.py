"""Benchmarks: timing (`timing`), the speed suite (`speed`), reports and plots (`report`).

Run from the command line with ``attnzoo bench --out DIR`` (see ``attnzoo bench --help``), or::

    from attnzoo.bench import get_suite, plan, run_suite, write_report
    suite = get_suite("auto")
    records = run_suite(plan(suite, patterns=["causal"]), "bench-out", suite=suite)
    write_report("bench-out/results.jsonl", "bench-out")

matplotlib and rich are optional: without them the plots are skipped (report.md says so) and progress
is plain text.
"""
from .report import write_report
from .speed import (attention_flops, fraction_of_ideal, get_suite, load_records, plan, run_suite, tflops_of,
                    visible_pairs)
from .timing import Unsupported, percentile, time_fn

__all__ = ["time_fn", "percentile", "Unsupported", "attention_flops", "visible_pairs", "tflops_of",
           "fraction_of_ideal", "get_suite", "plan", "run_suite", "load_records", "write_report"]
