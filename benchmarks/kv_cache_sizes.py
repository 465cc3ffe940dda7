"""KV-cache values and bytes per token per layer for MHA, GQA, MQA, MLA, CCA and CCGQA at the same model
width (CPU, no timing: the numbers come from each layer's ``kv_cache_values_per_token()``).

    PYTHONPATH=src python3 benchmarks/kv_cache_sizes.py [--dim 4096] [--heads 32] [--bytes 2]

Prints a markdown table (values, bytes at ``--bytes`` per value, ratio to MHA) and, for the layers whose
cache also holds a constant-size state (CCA's convolution state), that state separately.
"""
import argparse

from attnzoo.layers import CCA, CCGQA, MLA, Attention


def layers(dim: int, heads: int):
    head = dim // heads
    return [
        ("MHA", f"{heads} heads x {head}", Attention(dim, heads)),
        ("GQA 4:1", f"{heads}q / {heads // 4}kv x {head}", Attention(dim, heads, heads // 4)),
        ("GQA 8:1", f"{heads}q / {heads // 8}kv x {head}", Attention(dim, heads, heads // 8)),
        ("MQA", f"{heads}q / 1kv x {head}", Attention(dim, heads, 1)),
        ("MLA (DeepSeek-V2 shape)", f"kv_rank {4 * head}, rope 64", MLA(dim, heads, kv_rank=4 * head, rope_dim=64)),
        ("CCA C=2", f"{heads // 2} latent heads x {head}", CCA(dim, heads // 2, compression=2)),
        ("CCA C=4", f"{heads // 4} latent heads x {head}", CCA(dim, heads // 4, compression=4)),
        ("CCGQA C=2, 4:1", f"{heads // 2}q / {heads // 8}kv x {head}", CCGQA(dim, heads // 2, heads // 8, compression=2)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--bytes", type=int, default=2, help="bytes per cached value (2: bf16)")
    a = ap.parse_args()
    rows = layers(a.dim, a.heads)
    mha = rows[0][2].kv_cache_values_per_token()
    print(f"dim {a.dim}, {a.heads} query heads, {a.bytes} bytes per value; per token per layer\n")
    print("| layer | shape | values/token | bytes/token | vs MHA | constant state (values) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, layer in rows:
        n = layer.kv_cache_values_per_token()
        const = layer.conv_state_values() if hasattr(layer, "conv_state_values") else 0
        print(f"| {name} | {shape} | {n} | {n * a.bytes} | {n / mha:.3f} | {const or '-'} |")


if __name__ == "__main__":
    main()
