"""Test-time speed-up of Triton's CPU interpreter (TRITON_INTERPRET=1), which runs every Triton kernel in CI.

At each kernel launch the interpreter swaps `triton.language`'s builtins for interpreted ones (``_patch_lang``) and
puts them back when the launch ends. It also redoes that swap at every call of a ``@triton.jit`` helper inside the
kernel (``InterpretedFunction.__call__``): `tl.zeros`, `tl.sum`, `tl.cdiv` and our own helpers, thousands of times a
launch, each walking the modules with ``inspect.getmembers``. The kernels' tests spent about a quarter of their time
there (measured 2026-12-07 on a 2-core machine: KDA tests 43-46 s -> 33-34 s of CPU time, attention backward tests
62-69 s -> 52 s).

``patch_language_once`` keeps the swap made at the launch for the whole launch: a helper's call patches again only
when its module sees a language module (``triton.language`` / ``triton.language.core``) that this launch has not
patched yet, which is the interpreter's own behaviour for that module. What a kernel computes does not change; the
launch still restores the builtins at its end. Only the tests use it; without the interpreter, or with a Triton whose
interpreter lacks these internals, it does nothing.

``overflow_checks(False)`` turns off the interpreter's int32 overflow sanitizer (``sanitize_overflow``), which computes
every int32 add / sub / mul of a kernel again in int64 and compares it with int32's range. Without debug on
(TRITON_DEBUG=1) the assert that would read the comparison is dropped (`device_assert` returns early), so that work
checks nothing; it took about 30 % of the kernels' test time (attention backward tests 67.8 s -> 46.8 s, 2026-12-08,
2-core machine). conftest turns it off unless debug is on or ATTNZOO_TEST_OVERFLOW_CHECKS=1.
``overflow_checked()`` turns debug and the sanitizer on for a block, where an overflow raises:
tests/test_interp_speed.py runs a few attention kernels that way.
"""
import contextlib
import dataclasses
import inspect
import os


def patch_language_once():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        import triton.runtime.interpreter as ti
        original, scope_type = ti._patch_lang, ti._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_attnzoo_once", False):
        return True
    languages = (tl, tl.core)
    patched = [None]  # ids of the language modules patched in the launch under way, None between launches

    def seen(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages}

    def patch_lang(fn):
        mods = seen(fn)
        if patched[0] is not None:  # a helper called inside a launch
            if mods <= patched[0]:
                return scope_type()
            patched[0] |= mods
            return original(fn)
        scope = original(fn)  # a launch: its scope is restored when the launch ends
        patched[0] = mods
        restore = scope.restore

        def restore_and_end():
            patched[0] = None
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang._attnzoo_once = True
    ti._patch_lang = patch_lang
    return True


def _builder():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton.runtime.interpreter as ti
        builder = ti.interpreter_builder
        builder.options.sanitize_overflow  # noqa: B018 - (an interpreter without the option: do nothing)
        return builder
    except (ImportError, AttributeError):
        return None


def overflow_checks(on: bool):
    """Turn the interpreter's int32 overflow sanitizer on or off (kept on where debug is on, which reads it); returns
    what it was (None without the interpreter)."""
    builder = _builder()
    if builder is None:
        return None
    was = builder.options.sanitize_overflow
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=bool(on or builder.options.debug))
    return was


@contextlib.contextmanager
def overflow_checked():
    """The interpreter's debug asserts and int32 overflow sanitizer on inside the block: an int32 add / sub / mul
    that leaves int32's range raises (an AssertionError, wrapped in InterpreterError). Yields False without the
    interpreter."""
    builder = _builder()
    if builder is None:
        yield False
        return
    was = builder.options
    builder.options = dataclasses.replace(was, sanitize_overflow=True, debug=True)
    try:
        yield True
    finally:
        builder.options = was
