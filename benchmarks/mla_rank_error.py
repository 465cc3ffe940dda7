"""How well does a GQA layer survive conversion to MLA (TransMLA) at each latent rank? CPU, about 2 minutes.

    .venv/bin/python benchmarks/mla_rank_error.py [--steps 1000] [--out results.txt]

Prints, for a random GQA layer and for the two layers of a TinyLM briefly trained on MQAR (keys and
queries with real structure), the relative output error ``||mla(x) - gqa(x)|| / ||gqa(x)||`` (float64, on
held-out inputs) of ``to_mla(layer, rank, rope_dim=..., freq_fold=..., rorope=..., calib_x=...)``:

* ``rope_dim``: roped key dims kept (of ``kv_heads * head_dim``); the other key dims lose RoPE.
* ``rank``: latent width (``c_kv``), holding the NoPE keys and the values; ``cache = rank + rope_dim``
  values per token, ``vs GQA`` = that over ``2 * kv_heads * head_dim``. ``exact``: the lossless conversion.
* columns: RoRoPE ``pca`` (the paper: orthogonal, key energy) or ``bal`` (balanced key/query mixing),
  with the PCAs done from the weights alone or from calibration activations (``calib``).
* ``fold``: FreqFold width (adjacent frequencies share a rotation; approximate).
"""
from __future__ import annotations

import argparse
import sys

import torch

from attnzoo.bench.recall import TrainConfig, mqar_data, train
from attnzoo.layers import Attention, TinyLM
from attnzoo.layers.mla import to_mla_error_curve


def table(title, layer, x, calib, rope_dims, ranks_for, fold_rope_dims=()):
    """One table: a row per (rope_dim, freq_fold, rank), a column per (RoRoPE method, statistics)."""
    gd = layer.num_kv_heads * layer.head_dim
    lines = [f"## {title}", f"GQA: dim={layer.dim} heads={layer.num_heads} kv_heads={layer.num_kv_heads} "
             f"head_dim={layer.head_dim}; GQA cache = {layer.kv_cache_values_per_token()} values/token; "
             f"x: {tuple(x.shape)}", ""]
    cols = [("pca", None), ("pca", calib), ("balanced", None), ("balanced", calib)]
    names = ["pca/weights", "pca/calib", "bal/weights", "bal/calib"]
    head = f"{'rope_dim':>8} {'fold':>4} {'rank':>5} {'cache':>5} {'vs GQA':>6}  " + " ".join(f"{n:>11}" for n in names)
    lines += [head, "-" * len(head)]
    exact = to_mla_error_curve(layer, x, [None])[0]
    lines.append(f"{gd:>8} {1:>4} {'exact':>5} {exact['cache']:>5} {exact['cache'] / exact['gqa_cache']:>6.2f}  "
                 + " ".join(f"{exact['rel_error']:>11.1e}" for _ in names))
    for rope_dim in rope_dims:
        for fold in (1, 2) if rope_dim in fold_rope_dims else (1,):
            ranks = ranks_for(rope_dim)
            errs = [to_mla_error_curve(layer, x, ranks, rope_dim=rope_dim, calib_x=c, freq_fold=fold, rorope=m)
                    for m, c in cols]
            for i, r in enumerate(errs[0]):
                lines.append(f"{rope_dim:>8} {fold:>4} {r['rank']:>5} {r['cache']:>5} "
                             f"{r['cache'] / r['gqa_cache']:>6.2f}  " + " ".join(f"{e[i]['rel_error']:>11.3f}" for e in errs))
    return "\n".join(lines) + "\n"


def train_tinylm(steps, seed, d_model, n_heads, n_kv_heads, seq_len, kv_pairs, vocab, log):
    """A 2-layer TinyLM with GQA attention trained on MQAR by the recall benchmark's trainer."""
    torch.manual_seed(seed)
    model = TinyLM(vocab, d_model, 2, mixer=f"attention:n_kv_heads={n_kv_heads}", n_heads=n_heads)
    train_set = mqar_data("train", 20000, seq_len, kv_pairs, vocab, seed=seed)
    test_set = mqar_data("test", 1000, seq_len, kv_pairs, vocab, seed=seed)
    cfg = TrainConfig(lr=1e-3, batch_size=128, steps=steps, eval_every=max(1, steps // 4), seed=seed)
    res = train(model, train_set, test_set, cfg, device="cpu")
    log(f"TinyLM(d_model={d_model}, 2 layers, {n_heads} heads / {n_kv_heads} kv heads) trained on MQAR "
        f"(L={seq_len}, {kv_pairs} kv pairs, vocab {vocab}): {res['steps']} steps in {res['wall_s']:.0f} s, "
        f"test accuracy {res['acc']:.3f}")
    return model.eval(), train_set[0], test_set[0]


def layer_inputs(model, idx):
    """The inputs of each block's mixer (after its norm) for token ids ``idx``."""
    got = {}
    hooks = [b.mixer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.hidden(idx)
    for h in hooks:
        h.remove()
    return [got[i] for i in range(len(model.blocks))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="MQAR training steps of the TinyLM (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the tables to this file")
    args = ap.parse_args(argv)
    out = []

    def log(s=""):
        print(s, flush=True)
        out.append(s)

    log(f"# GQA -> MLA (to_mla) relative output error vs latent rank; torch {torch.__version__}, float64, CPU")
    log()
    dim, heads, kv_heads = 128, 4, 2
    hd = dim // heads
    gd = kv_heads * hd

    def ranks_for(rope_dim):
        nz = 2 * gd - rope_dim
        return sorted({r for r in (4, 8, 16, 32, 48, 64, 96) if r <= nz} | {nz})

    rope_dims = (hd // 2, hd, gd // 2 + hd // 2)
    torch.manual_seed(args.seed)
    rnd = Attention(dim, heads, kv_heads).double()
    x = torch.randn(16, 64, dim, dtype=torch.float64)
    calib = torch.randn(64, 64, dim, dtype=torch.float64)
    log(table("random GQA layer (nn.Linear init), x ~ N(0, 1), calib = other N(0, 1) samples", rnd, x, calib,
              rope_dims, ranks_for))

    if args.steps > 0:
        model, train_x, test_x = train_tinylm(args.steps, args.seed, dim, heads, kv_heads, seq_len=64,
                                              kv_pairs=4, vocab=2048, log=log)
        model = model.double()
        calib_in = layer_inputs(model, train_x[:256])
        test_in = layer_inputs(model, test_x[:64])
        log()
        for i, block in enumerate(model.blocks):
            log(table(f"trained layer {i} (MQAR TinyLM), held-out hidden states; calib = 256 training sequences",
                      block.mixer, test_in[i], calib_in[i], rope_dims, ranks_for, fold_rope_dims=(hd,)))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
