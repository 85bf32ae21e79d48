"""Cost of the VQ head: a causal transformer with and without it, side by side in one run (ratios, not times).

    python benchmarks/bench_quantized.py [--layers 2] [--codebook-size 4096] [--codebook-dim 256] [--repeats 5]

Same weights for both (QuantizedCausalWanTransformer3DModel.from_unquantized), one block of 3 latent frames of
16x16 (= 192 tokens), eval mode, float32, no gradient. Prints a markdown table: milliseconds per forward
(median of repeats, interleaved), ratio, and the head's share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel
from engine.testing import tiny_transformer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256, help="heads x 64")
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument("--codebook-dim", type=int, default=256)
    p.add_argument("--quantizer", default="vq", choices=["vq", "fsq"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base = tiny_transformer(num_layers=a.layers, num_attention_heads=a.width // 64, attention_head_dim=64,
                            ffn_dim=4 * a.width).eval()
    kw = (dict(codebook_size=a.codebook_size, codebook_dim=a.codebook_dim) if a.quantizer == "vq"
          else dict(quantizer="fsq", fsq_levels=[8, 8, 8, 5, 5, 5], codebook_size=None))
    quant = QuantizedCausalWanTransformer3DModel.from_unquantized(base, **kw).eval()
    x, cond, t = torch.randn(1, 4, 3, 16, 16), torch.randn(1, 8, 32), torch.full((1, 3), 500.0)
    with torch.no_grad():
        quant(x, t, cond)  # k-means initialisation of the fresh codebook, and warm-up
        base(x, t, cond)
        times = {"causal": [], "quantized": []}
        for _ in range(a.repeats):
            for name, m in (("causal", base), ("quantized", quant)):
                t0 = time.perf_counter()
                m(x, t, cond)
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"| model | ms / forward | ratio |\n|---|---:|---:|\n| causal ({a.layers} layers, width {a.width}) | "
          f"{ms['causal']:.1f} | 1.00 |\n| + {a.quantizer} head ({quant.codebook_size} codes x "
          f"{quant.vq_head.codebook_dim}) | {ms['quantized']:.1f} | {ms['quantized'] / ms['causal']:.2f} |")


if __name__ == "__main__":
    main()
