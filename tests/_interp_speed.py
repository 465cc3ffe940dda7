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
"""
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
