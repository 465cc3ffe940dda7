"""benchmarks/kernel_spills.py: a linear kernel compiled for sm_90 on the CPU reports its registers and stack
(in a subprocess: this process runs Triton's interpreter, which cannot compile for a GPU target)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOL = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(not os.path.exists(TOOL), reason="Triton's bundled cuobjdump is not there")
@pytest.mark.parametrize("args, line", [(["--filter", "gla _bwd_dv"], r"gla _bwd_dv\s+4 warps"),
                                        (["--attn", "--filter", "attn dq 128x64"], r"attn dq 128x64\s+8 warps"),
                                        (["--sass", "--filter", "gdn _fwd_h (BV 32)"], r"gdn _fwd_h \(BV 32\)\s+8 warps")])
def test_kernel_spills_reports_registers_and_stack(args, line):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_spills.py"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-1500:]
    m = re.search(line + r"\s+(\d+) regs\s+(\d+) B stack", out.stdout)
    assert m and 0 < int(m.group(1)) <= 255, out.stdout
    if "--sass" in args:  # the instruction mix: a Hopper dot of 64 rows runs on wgmma, and spills show as LDL / STL
        mix = re.search(r"wgmma (\d+)\s+mma (\d+)\s+spill_ld (\d+)\s+spill_st (\d+)\s+mufu (\d+)\s+instructions (\d+)",
                        out.stdout)
        assert mix, out.stdout
        wgmma, _, ld, st, _, total = map(int, mix.groups())
        assert wgmma > 0 and total > wgmma
        assert (ld + st > 0) == (int(m.group(2)) > 0)  # local-memory traffic exactly when there is a stack
