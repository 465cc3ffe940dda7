"""Progress output shared by the benchmarks: rich bars on a terminal, plain numbered lines otherwise,
nothing when disabled."""
from __future__ import annotations

import sys


class Bars:
    """``task(what, total)`` adds a bar; ``item_done(task, line)`` prints a finished item's line (with an
    ``[n/total]`` counter when there are no bars) and advances its bar; ``update`` moves a bar."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled, self.stream = enabled, stream or sys.stdout
        self._rich, self._totals, self._counts = None, {}, {}
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
                self._rich = Progress(TextColumn("[bold]{task.fields[what]}[/]"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"),
                                      console=Console(file=self.stream), transient=False)
                self._rich.start()
            except Exception:  # noqa: BLE001 - rich missing or unusable: plain text
                self._rich = None

    @property
    def rich(self) -> bool:
        return self._rich is not None

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def task(self, what: str, total: int, visible: bool = True):
        key = len(self._totals)
        self._totals[key], self._counts[key] = total, 0
        if self._rich is not None:
            self._totals[key] = (total, self._rich.add_task("", total=total, what=what, visible=visible))
        return key

    def _rid(self, key):
        t = self._totals.get(key)
        return t[1] if isinstance(t, tuple) else None

    def update(self, key, **kw) -> None:
        """``completed``, ``total``, ``description``, ``visible``, ``advance`` of a bar (no-op without rich)."""
        if self._rich is not None and self._rid(key) is not None:
            if "total" in kw:
                self._rich.reset(self._rid(key), total=kw.pop("total"))
            self._rich.update(self._rid(key), **kw)

    def item_done(self, key, line: str) -> None:
        self._counts[key] += 1
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(f"  {line}", markup=False, highlight=False)
            self._rich.advance(self._rid(key))
        else:
            total = self._totals[key]
            total = total[0] if isinstance(total, tuple) else total
            width = len(str(total))
            print(f"[{self._counts[key]:>{width}}/{total}] {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def training_description(info: dict, acc_name: str = "test acc") -> str:
    acc = info.get("acc")
    return f"loss {info['loss']:.3f}" + (f", {acc_name} {acc:.3f}" if acc is not None else "")
