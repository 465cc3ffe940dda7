"""SeerAttention's distilled gate against training-free top-k block routing, on a TinyLM trained on MQAR (CPU).

    python benchmarks/seer_distill.py                                  # ~3 min on 2 CPU cores
    python benchmarks/seer_distill.py --model-cache /tmp/mqar_lm.pt    # reuse the trained model on reruns

1. Train a 2-layer attention TinyLM (d_model 64, one head of 64) on MQAR with the CPU recall grid's setting
   (L = 64, K = 4 pairs, V = 2048, batch 128, lr 3e-3, up to 1000 steps, early stop at 0.99;
   `attnzoo.bench.recall`).
2. Capture q, k, v of both attention layers (`attnzoo.routing.capture_qk`) on training sequences (for the
   distillation) and on held-out test sequences (for the evaluation).
3. Per layer, distill `SeerGate`s from the block-pooled true attention (`distill_gate`, 300 AdamW steps) --
   variants: the paper's gate (q avg, k max+min pooling) on the paper's max-pooled targets with the RoPE
   handling (``rope_base`` = the model's), the same without it, the same on sum-pooled (block mass)
   targets, and a wider gate (q and k each avg+max+min) -- and keep an untrained gate of the same init.
4. Per layer and top_k, `evaluate` on the test q, k, v: attention-mass recall, output relative error,
   density (share of causal pairs computed), for the `SeerRouter`s and for `TopKBlocks` (mean and max-min
   pooling, training-free). Every router keeps the same forced blocks (default: no sink block, one local
   block -- with a sink block the whole MQAR prefix of L=64 sits in it and any router is perfect) and the same
   top_k, hence the same density. Then the model's MQAR accuracy with each router's sparse attention in
   *both* layers (answer tokens of the test set, reference backend).

Block 4 (16 blocks per sequence of 64) by default: the task is short, so blocks are small to leave routing
something to choose.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from attnzoo.bench.recall import TrainConfig, derive_seed, evaluate as mqar_evaluate, mqar_data, train
from attnzoo.layers import TinyLM
from attnzoo.routing import SeerGate, SeerRouter, TopKBlocks, capture_qk, distill_gate, evaluate


def log(*a):
    print(*a, flush=True)


def train_model(args):
    tr = mqar_data("train", args.n_train, args.seq_len, args.kv, args.vocab)
    te = mqar_data("test", args.n_test, args.seq_len, args.kv, args.vocab)
    torch.manual_seed(derive_seed("init", 0, "attention", args.d_model))
    model = TinyLM(args.vocab, args.d_model, 2, "attention")
    if args.model_cache and os.path.exists(args.model_cache):
        model.load_state_dict(torch.load(args.model_cache))
        log(f"model: loaded {args.model_cache}")
        return model, tr, te
    cfg = TrainConfig(lr=3e-3, batch_size=128, steps=args.train_steps, eval_every=100, early_stop_acc=0.99)
    res = train(model, tr, te, cfg)
    log(f"model: TinyLM d_model={args.d_model} 2 layers x {model.n_heads} head, MQAR L={args.seq_len} "
        f"K={args.kv} V={args.vocab}: test acc {res['acc']:.3f} after {res['steps']} steps ({res['wall_s']:.0f}s)")
    if args.model_cache:
        torch.save(model.state_dict(), args.model_cache)
    return model, tr, te


def mean(x):
    return float(x.float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=1_000)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sinks", type=int, default=0, help="first blocks always kept (0: the MQAR prefix must be "
                    "found by the router, not kept for free)")
    ap.add_argument("--local", type=int, default=1, help="diagonal blocks always kept")
    ap.add_argument("--distill-seqs", type=int, default=1024, help="training sequences captured for distillation")
    ap.add_argument("--eval-seqs", type=int, default=256, help="test sequences for recall / error / density")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=1e-2)
    ap.add_argument("--distill-batch", type=int, default=64)
    ap.add_argument("--model-cache", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log(f"# seer_distill: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; args {vars(args)}")

    model, tr, te = train_model(args)
    model.eval()
    fit = capture_qk(model, tr[0][:args.distill_seqs])
    ev = capture_qk(model, te[0][:args.eval_seqs], values=True)
    layers = list(fit)
    attn0 = model.blocks[0].mixer
    rope_base = attn0.rotary.base if attn0.rotary is not None else None
    h, hkv, d = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
    bs = args.block
    paper = dict(q_pooling=("avg",), k_pooling=("max", "min"))          # the paper's default gate
    wide = dict(q_pooling=("avg", "max", "min"), k_pooling=("max", "min", "avg"))
    variants = {  # name: (target pooling, rope handling, gate poolings)
        "seer max+rope": ("max", rope_base, paper),
        "seer max": ("max", None, paper),
        "seer sum+rope": ("sum", rope_base, paper),
        "seer max+rope qk3": ("max", rope_base, wide),
    }
    gates = {}
    for li, name in enumerate(layers):
        for vname, (tp, rb, pools) in variants.items():
            torch.manual_seed(derive_seed("gate", li))
            gate = SeerGate(h, d, hkv, block_size=bs, rope_base=rb, **pools)
            if vname == "seer max+rope":
                untrained = SeerGate(h, d, hkv, block_size=bs, rope_base=rb, **pools)
                untrained.load_state_dict(gate.state_dict())
                gates[(name, "seer untrained")] = untrained
            t1 = time.perf_counter()
            hist = distill_gate(gate, fit[name], steps=args.distill_steps, lr=args.distill_lr,
                                batch_size=args.distill_batch, target_pooling=tp, progress=False)
            gates[(name, vname)] = gate
            log(f"distill {name} [{vname}]: KL {sum(hist[:10]) / 10:.4f} -> {sum(hist[-10:]) / 10:.4f} "
                f"({len(hist)} steps, {time.perf_counter() - t1:.1f}s)")

    router_names = list(variants) + ["seer untrained", "topk mean", "topk maxmin"]

    keep = dict(sinks=args.sinks, local=args.local)

    def make(name, layer, top_k):
        if name == "topk mean":
            return TopKBlocks(bs, top_k=top_k, **keep)
        if name == "topk maxmin":
            return TopKBlocks(bs, top_k=top_k, pooling="maxmin", **keep)
        return SeerRouter(gates[(layer, name)], top_k=top_k, **keep)

    nb = -(-args.seq_len // bs)
    log(f"\n## routing quality on {args.eval_seqs} held-out sequences (L={args.seq_len}, block {bs}: {nb} blocks; "
        f"sinks={args.sinks}, local={args.local} always kept; density = computed / causal pairs)")
    log(f"{'layer':<16} {'top_k':>5} {'router':<18} {'recall':>7} {'rel_err':>8} {'density':>8}")
    for name in layers:
        q, k, v = ev[name]
        for top_k in args.top_k:
            for rn in router_names:
                r = evaluate(q, k, v, make(rn, name, top_k))
                log(f"{name:<16} {top_k:>5} {rn:<18} {mean(r['recall']):7.4f} {mean(r['rel_error']):8.4f} "
                    f"{mean(r['density']):8.4f}")

    log(f"\n## MQAR accuracy on {args.n_test} test sequences with the routed sparse attention in both layers "
        "(backend: reference)")
    dense = mqar_evaluate(model, *te)
    log(f"{'dense causal':<30} acc {dense['acc']:.4f}")
    mixers = [b.mixer for b in model.blocks]
    saved = [(m.pattern, m.backend) for m in mixers]
    try:
        for top_k in args.top_k:
            for rn in router_names:
                for m, name in zip(mixers, layers):
                    m.pattern, m.backend = make(rn, name, top_k), "reference"
                res = mqar_evaluate(model, *te)
                log(f"{rn + f' top_k={top_k}':<30} acc {res['acc']:.4f}")
    finally:
        for m, (p, b) in zip(mixers, saved):
            m.pattern, m.backend = p, b
    log(f"\n# total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
