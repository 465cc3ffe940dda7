"""Inputs and gradient plumbing shared by the linear-family tests."""
import importlib.util
import pathlib

import torch
import torch.nn.functional as F

import attnzoo.linear as lin

# name -> (op, step, gate kind ("vector" | "scalar" | None), has beta)
OPS = {
    "gla": (lin.gla, lin.gla_step, "vector", False),
    "delta_rule": (lin.delta_rule, lin.delta_rule_step, None, True),
    "gated_delta_rule": (lin.gated_delta_rule, lin.gated_delta_rule_step, "scalar", True),
    "kda": (lin.kda, lin.kda_step, "vector", True),
}


def make_inputs(name, b=2, h=2, t=37, dk=8, dv=6, seed=0, strong=False, state=True, n_state=None):
    """Leaf tensors (float64, requires_grad) in the papers' ranges: gates logsigmoid(x)/16 (some channels
    down to about -5 per step when ``strong``), beta = sigmoid(x), keys L2-normalised for the delta family."""
    _, _, gate, has_beta = OPS[name]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(b, h, t, dk), rnd(b, h, t, dk), rnd(b, h, t, dv)
    if has_beta:
        k = F.normalize(k, dim=-1)
    args = {"q": q, "k": k, "v": v}
    if gate == "vector":
        g = F.logsigmoid(rnd(b, h, t, dk)) / 16
        if strong:
            g[..., : max(1, dk // 4)] = -5 * torch.rand(b, h, t, max(1, dk // 4), generator=gen, dtype=torch.float64)
        args["g"] = g
    elif gate == "scalar":
        g = F.logsigmoid(rnd(b, h, t)) / (1 if strong else 4)
        args["g"] = g
    if has_beta:
        args["beta"] = torch.sigmoid(rnd(b, h, t))
    if state:
        args["initial_state"] = rnd(b if n_state is None else n_state, h, dk, dv)
    return {key: x.requires_grad_() for key, x in args.items()}


def cast(args, dtype):
    return {key: x.detach().to(dtype).requires_grad_() for key, x in args.items()}


def outputs_and_grads(fn, args, seed=1):
    """Run ``fn(**args) -> (o, state)`` and back-propagate a random linear function of o and the state.
    Returns {"o", "state", "d<arg>"...} (detached)."""
    o, s = fn(**args)
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    loss = (o * wo).sum() + (s * ws).sum()
    leaves = {key: x for key, x in args.items() if isinstance(x, torch.Tensor) and x.requires_grad}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res = {"o": o.detach(), "state": s.detach()}
    res.update({"d" + key: g.detach() for key, g in zip(leaves, grads)})
    return res


# -- the Triton kernel tests ----------------------------------------------------------------------------
import os  # noqa: E402

import pytest  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# every Triton test module: runs on CUDA, or on CPU under the interpreter, with one intra-op thread
TRITON_MARKS = [pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1"),
                pytest.mark.usefixtures("one_thread")]
# delta-family kernels (triton_delta / triton_kda) at interpreter-sized blocks: sub-chunks of 16, state
# tiles and Dv blocks smaller than the head dims
DELTA_SMALL = dict(BC=16, BV_P=16, BV_H=16, BV_O=16, BV_B=16, warps_p=1, warps_h=1, warps_o=1, warps_b=1,
                   stages=1, prec_t="ieee")
DELTA_SUB32 = dict(DELTA_SMALL, BT=32)
DELTA_SUB64 = dict(DELTA_SMALL, BT=64)
DELTA_NAMES = ("q", "k", "v", "g", "beta", "s0")


def load_benchmark(name):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
