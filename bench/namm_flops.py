"""How much arithmetic the NAMM adds to a model, counted rather than timed.

    .venv/bin/python bench/namm_flops.py

For one memory update (512 new tokens, every layer) with S tokens in the cache, counts the
floating-point operations of
  - the model: its linear layers for the 512 tokens and their attention over S keys;
  - the NAMM's features: a 32-point windowed DFT per key, per frame (32 frames), per layer
    and KV head, as `fold_rows` computes it;
  - the NAMM's scorer (BAM): projections for S tokens and a causal attention of S tokens over
    each other, per layer and KV head.
The BAM part grows as S^2 while the model's attention grows as 512 x S, so the ratio depends
on the cache size the NAMM keeps and on how large the model is per KV head. This is the floor
under the measured overhead in bench/results/memory.md. (Sliding-window layers, as in Gemma 3,
would shrink both sides; the two models here have none.) Writes bench/results/namm_flops.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402

# public architecture figures (the models' config.json files)
MODELS = {
    "SmolLM2-135M": dict(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64),
    "Llama-3-8B": dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128),
}
CHUNK, N_FFT, N_FREQ, FEATURES, BAM_DIM = 512, 32, 17, 25, 32


def model_flops(m: dict, cached: int) -> float:
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    linear_params = m["layers"] * (m["hidden"] * (2 * q + 2 * kv) + 3 * m["hidden"] * m["inter"])
    attention = m["layers"] * m["heads"] * CHUNK * cached * m["head_dim"] * 4   # QK and PV, multiply-add
    return 2 * linear_params * CHUNK + attention


def namm_flops(m: dict, cached: int) -> tuple[float, float]:
    rows = m["layers"] * m["kv_heads"]
    features = rows * (CHUNK // 16) * cached * (2 * 2 * N_FREQ * N_FFT)
    projections = cached * 2 * (FEATURES * 3 * BAM_DIM + BAM_DIM * 2 * FEATURES + FEATURES)
    attention = 4 * (cached * cached / 2) * BAM_DIM                               # causal: half the pairs
    return features, rows * (projections + attention)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000, 32768])
    p.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.25])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "namm_flops.md")
    args = p.parse_args(argv)
    header = ("model", "tokens", "retention", "cache at update", "model GFLOP", "features GFLOP",
              "BAM GFLOP", "NAMM / model")
    rows = []
    for name, m in MODELS.items():
        for n in args.lengths:
            for r in args.retentions:
                cached = min(n, int(r * n) + CHUNK)  # kept tokens plus the chunk just added
                base, (feat, bam) = model_flops(m, cached), namm_flops(m, cached)
                rows.append((name, n, f"{r:g}", cached, f"{base / 1e9:.0f}", f"{feat / 1e9:.1f}",
                             f"{bam / 1e9:.1f}", f"{100 * (feat + bam) / base:.1f}%"))
    text = ("FLOPs of one memory update (512 new tokens through every layer), the cache holding the kept "
            "tokens plus the new chunk.\n\n" + markdown_table(header, rows) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
