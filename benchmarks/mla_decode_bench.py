"""One decode step (one new token per sequence against a long cache): MLA absorbed vs MLA naive vs GQA.

    PYTHONPATH=src python3 benchmarks/mla_decode_bench.py --out benchmarks/results/<dir>/mla_decode.jsonl
    python3 benchmarks/mla_decode_bench.py --smoke          # tiny shapes on the CPU (a check, not a measurement)

Defaults: bf16, batch 8, 32K cached tokens, dim 4096, 32 query heads. MLA: kv_rank 512, rope 64, nope/v head
dims 128 (DeepSeek-V2/V3's attention widths; no query compression unless --q-rank), cache 576 values per
token. GQA `Attention`: 8 kv heads of 128, cache 2048 values per token.

Measured, in one process (the protocol: warm-up, CUDA events, an L2 flush before each repetition, median
with 20th / 80th percentiles):

* ``layer``: the whole module, ``layer(x_new, cache)``, x_new (batch, 1, dim): projections, RoPE, the cache
  append (in place: the caches are pre-sized, and rolled back to the context length before each call) and
  attention. MLA ``absorbed`` attends in the latent space (one shared 576-wide key head, values = the 512
  latent dims, W_uv after); ``naive`` up-projects keys and values of all cached tokens for all heads first.
* ``attention``: the attention call alone on the same cache (GQA: 32 q heads over 8 kv heads, causal;
  MLA absorbed: the 32 heads folded into the query axis over the one latent head, as the layer does).

The absorbed attention has 576-wide keys and 512-wide values: no FlashAttention / Triton kernel here takes
them, so ``attnzoo.attention`` lands on PyTorch SDPA (the layer folds the heads into the query axis, one
latent head, so SDPA needs no GQA support). Which SDPA kernel PyTorch then picks matters (the
memory-efficient one may run few thread blocks at batch x 1 head), so the absorbed rows are also timed with
each SDPA kernel forced (``sdpa_kernel``: efficient, math, cudnn, flash; ``auto`` = PyTorch's choice); a
kernel that cannot run gives an ``error``/``unsupported`` record.

Each is timed eagerly and replayed from a CUDA graph (``mode``; the graph shows the GPU time without the
Python launch overhead, which a ~20-kernel decode step at these sizes can otherwise be dominated by).
Reported: time, cache bytes read per step (batch x context x cache values per token x element size),
achieved GB/s on those bytes and on cache + weights, and cache bytes per token. Before timing, a check:
the bf16 absorbed and naive outputs against the same layer in float32 (the absorbed path passes when its
max error is at most 2x the naive path's + 1e-5, the protocol's rule with the naive path as the plain one).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnzoo as az
from attnzoo.bench.timing import time_fn
from attnzoo.layers import Attention, KVCache
from attnzoo.layers.mla import MLA, MLACache

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "flash": SDPBackend.FLASH_ATTENTION}


def forcing(fn, kernel):
    """``fn`` run with only one SDPA kernel allowed."""
    def run():
        with sdpa_kernel([KERNELS[kernel]]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # PyTorch explains each kernel it cannot use
            return fn()
    return run


class StaticKVCache(KVCache):
    """A pre-sized `KVCache` for the GQA layer: appends write in place (as serving engines do), so that the
    GQA step is not charged for re-concatenating its whole cache (what `KVCache` does)."""

    def __init__(self, k_buf: torch.Tensor, v_buf: torch.Tensor, seen: int):
        super().__init__()
        self.k_buf, self.v_buf, self.seen = k_buf, v_buf, seen
        self.k, self.v = k_buf[:, :, :seen], v_buf[:, :, :seen]

    def append(self, k, v):
        end = self.seen + k.shape[2]
        if end > self.k_buf.shape[2]:
            raise ValueError(f"StaticKVCache holds {self.k_buf.shape[2]} tokens; cannot grow to {end}")
        self.k_buf[:, :, self.seen:end] = k
        self.v_buf[:, :, self.seen:end] = v
        self.seen = end
        self.k, self.v = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.k, self.v


def graphed(fn):
    """``fn`` captured in a CUDA graph -> its replay."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def env(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(device=name, torch=torch.__version__, attnzoo=az.__version__)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def build(args, device, dtype):
    torch.manual_seed(args.seed)
    b, s = args.batch, args.context
    gqa = Attention(args.dim, args.heads, args.kv_heads, args.head_dim, backend=args.backend)
    gqa = gqa.to(device=device, dtype=dtype).eval()
    # the caches hold random values (never time on zeros), one spare slot for the new token
    k_buf = torch.randn(b, args.kv_heads, s + 1, args.head_dim, device=device, dtype=dtype)
    v_buf = torch.randn_like(k_buf)
    mla = MLA(args.dim, args.heads, kv_rank=args.kv_rank, q_rank=args.q_rank, nope_head_dim=args.nope_dim,
              rope_dim=args.rope_dim, v_head_dim=args.v_dim, backend=args.backend)
    with torch.no_grad():   # RMSNorm'd latents are O(1): keep the random cache on that scale
        mla.kv_norm.weight.uniform_(0.5, 1.5)
    mla = mla.to(device=device, dtype=dtype).eval()
    lat = torch.randn(b, s + 1, args.kv_rank + args.rope_dim, device=device, dtype=dtype)
    x = torch.randn(b, 1, args.dim, device=device, dtype=dtype)
    return gqa, (k_buf, v_buf), mla, lat, x


def mla_cache(lat: torch.Tensor, kv_rank: int, seen: int) -> MLACache:
    c = MLACache()
    c.buf, c.kv_rank, c.seen = lat, kv_rank, seen
    return c


def check(args, mla, lat, x) -> dict:
    """bf16 absorbed and naive outputs of one step against the same layer and cache in float32."""
    s = args.context
    ref = copy.deepcopy(mla).float()
    ref.absorb = False   # the plain path
    with torch.no_grad():
        want = ref(x.float(), mla_cache(lat.float().clone(), args.kv_rank, s)).double()
        errs = {}
        for name, absorb in (("absorbed", True), ("naive", False)):
            mla.absorb = absorb
            got = mla(x, mla_cache(lat.clone(), args.kv_rank, s)).double()
            errs[name] = dict(max_err=float((got - want).abs().max()),
                              rel_rmse=float((got - want).norm() / want.norm()))
        mla.absorb = None
    ok = errs["absorbed"]["max_err"] <= 2 * errs["naive"]["max_err"] + 1e-5 and errs["absorbed"]["rel_rmse"] < 5e-3
    del ref
    return dict(kind="check", status="pass" if ok else "FAIL", absorbed=errs["absorbed"], naive=errs["naive"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768, help="cached tokens before the new one")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8, help="GQA key/value heads")
    ap.add_argument("--head-dim", type=int, default=128, help="GQA head dim")
    ap.add_argument("--kv-rank", type=int, default=512)
    ap.add_argument("--q-rank", type=int, default=None, help="MLA query latent (default: direct projection)")
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--nope-dim", type=int, default=128)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--backend", default="auto", help="attnzoo backend for every layer")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-graph", action="store_true", help="time eagerly only (no CUDA graph replay)")
    ap.add_argument("--no-kernel-sweep", action="store_true", help="skip the rows with one SDPA kernel forced")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write one JSON line per measurement here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes in float32 on the CPU (checks that the script runs; not a measurement)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.context, args.dim, args.heads, args.kv_heads, args.head_dim = 2, 64, 64, 4, 2, 16
        args.kv_rank, args.rope_dim, args.nope_dim, args.v_dim = 16, 8, 16, 16
        args.dtype, args.reps, args.warmup, args.no_graph = "fp32", 3, 1, True
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    graph_ok = device.type == "cuda" and not args.no_graph
    esize = torch.empty((), dtype=dtype).element_size()
    b, s = args.batch, args.context

    gqa, (k_buf, v_buf), mla, lat, x = build(args, device, dtype)
    base = dict(batch=b, context=s, dim=args.dim, heads=args.heads, dtype=args.dtype, backend=args.backend,
                **env(device))
    rows = []

    def emit(row):
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    chk = check(args, mla, lat, x)
    emit(dict(base, **chk))
    print(f"check ({args.dtype} vs the same layer in fp32, naive path): absorbed max err {chk['absorbed']['max_err']:.3g} "
          f"(rel rmse {chk['absorbed']['rel_rmse']:.2g}), naive {chk['naive']['max_err']:.3g} "
          f"(rel rmse {chk['naive']['rel_rmse']:.2g}) -> {chk['status']}", flush=True)

    gqa_cache = StaticKVCache(k_buf, v_buf, s)
    m_cache = mla_cache(lat, args.kv_rank, s)

    def gqa_step():
        gqa_cache.seen = s
        return gqa(x, gqa_cache)

    def mla_step(absorb):
        def step():
            m_cache.seen = s
            mla.absorb = absorb
            return mla(x, m_cache)
        return step

    # the attention calls alone, on the same caches
    qg = torch.randn(b, args.heads, 1, args.head_dim, device=device, dtype=dtype)
    ql = torch.randn(b, 1, args.heads, args.kv_rank + args.rope_dim, device=device, dtype=dtype)
    scale = (args.nope_dim + args.rope_dim) ** -0.5

    def gqa_attn():
        return az.attention(qg, k_buf[:, :, :s + 1], v_buf[:, :, :s + 1], az.Causal(), backend=args.backend)

    def mla_attn():
        latent = lat[:, None, :s + 1]
        return az.attention(ql, latent, latent[..., :args.kv_rank], None, scale=scale, backend=args.backend)

    gqa_vals = gqa.kv_cache_values_per_token()
    mla_vals = mla.kv_cache_values_per_token()
    cases = [("gqa", "layer", "auto", gqa_step, gqa_vals, param_bytes(gqa)),
             ("mla-absorbed", "layer", "auto", mla_step(True), mla_vals, param_bytes(mla)),
             ("mla-naive", "layer", "auto", mla_step(False), mla_vals, param_bytes(mla)),
             ("gqa", "attention", "auto", gqa_attn, gqa_vals, 0),
             ("mla-absorbed", "attention", "auto", mla_attn, mla_vals, 0)]
    if args.backend in ("auto", "sdpa") and not args.no_kernel_sweep:
        for kernel in KERNELS:
            cases += [("mla-absorbed", "layer", kernel, forcing(mla_step(True), kernel), mla_vals, param_bytes(mla)),
                      ("mla-absorbed", "attention", kernel, forcing(mla_attn, kernel), mla_vals, 0)]
    shapes = dict(gqa=dict(kv_heads=args.kv_heads, head_dim=args.head_dim),
                  **{m: dict(kv_rank=args.kv_rank, rope_dim=args.rope_dim, nope_dim=args.nope_dim, v_dim=args.v_dim,
                             q_rank=args.q_rank) for m in ("mla-absorbed", "mla-naive")})
    with torch.inference_mode():
        for method, part, kernel, fn, vals, wbytes in cases:
            cache_bytes = b * (s + 1) * vals * esize
            for mode in (("graph", "eager") if graph_ok else ("eager",)):
                row = dict(base, kind="speed", method=method, part=part, sdpa_kernel=kernel, mode=mode, **shapes[method],
                           cache_values_per_token=vals, cache_bytes_per_token=vals * esize, cache_bytes=cache_bytes,
                           weight_bytes=wbytes)
                run = fn
                if mode == "graph":
                    try:
                        run = graphed(fn)
                    except Exception as e:  # noqa: BLE001 - a step that cannot be captured is a record
                        emit(dict(row, status="error", message=f"capture: {e}"[:500], median_ms=None))
                        continue
                r = time_fn(run, device=device, warmup=args.warmup, reps=args.reps, max_time_s=10.0)
                ok = r["status"] == "ok"
                sec = r["median_ms"] * 1e-3 if ok else None
                row.update(status=r["status"], message=r["message"], median_ms=r["median_ms"], p20_ms=r["p20_ms"],
                           p80_ms=r["p80_ms"], compile_ms=r["compile_ms"], peak_mem_bytes=r["peak_mem_bytes"],
                           reps=r["reps"], gbps_cache=cache_bytes / sec / 1e9 if ok else None,
                           gbps_total=(cache_bytes + wbytes) / sec / 1e9 if ok else None)
                emit(row)
                print(f"  {method:<13} {part:<9} {kernel:<9} {mode:<5} {r['status']:<11} "
                      + (f"{r['median_ms'] * 1e3:9.1f} us" if ok else r["message"][:80]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\ndecode step: batch {b}, context {s}, dim {args.dim}, {args.heads} q heads, {args.dtype}, "
          f"device {base['device']}" + ("  [SMOKE: tiny CPU shapes, not a measurement]" if args.smoke else ""))
    print(f"GQA {args.kv_heads} kv heads x {args.head_dim}: {gqa_vals * esize} B/token cache; MLA kv_rank "
          f"{args.kv_rank} + rope {args.rope_dim}: {mla_vals * esize} B/token ({gqa_vals / mla_vals:.2f}x smaller)")
    hdr = f"{'method':<13} {'part':<9} {'sdpa':<9} {'mode':<5} {'median us':>10} {'p20-p80 us':>15} {'cache MB':>9} " \
          f"{'GB/s cache':>10} {'GB/s +wts':>9} {'B/token':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("kind") != "speed":
            continue
        if r["status"] != "ok":
            print(f"{r['method']:<13} {r['part']:<9} {r['sdpa_kernel']:<9} {r['mode']:<5} {r['status']}: "
                  f"{r['message'][:60]}")
            continue
        print(f"{r['method']:<13} {r['part']:<9} {r['sdpa_kernel']:<9} {r['mode']:<5} {r['median_ms'] * 1e3:>10.1f} "
              f"{r['p20_ms'] * 1e3:>7.1f}-{r['p80_ms'] * 1e3:<7.1f} {r['cache_bytes'] / 1e6:>9.1f} "
              f"{r['gbps_cache']:>10.1f} {r['gbps_total']:>9.1f} {r['cache_bytes_per_token']:>7}")
    return 0 if chk["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
