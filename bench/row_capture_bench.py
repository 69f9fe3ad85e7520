"""What a NAMM's attention rows cost, per layer and chunk, against the fused kernel every other
policy runs: the memory's own attention function (`namm_core.attention.namm_attention_forward`)
on one SmolLM2-shaped layer (9 query heads over 3 KV heads, head dim 64), a chunk of 256 queries
over a cache of S slots, and the spectrogram fold of the rows it hands over.

    .venv/bin/python bench/row_capture_bench.py       # ~1 min; writes bench/results/row_capture.md

Ways timed, each on the same inputs:
- `fused`: no rows read (StreamingLLM, H2O without rows, ...): torch's fused sdpa with the memory's mask;
- `inline` / `inline, rows bf16`: the eager attention that hands its probabilities over
  (the NAMM's default on CPU; rows in float32, or in bfloat16 as `obs=bf16`);
- `separate`: every output from the fused kernel, the rows computed apart without the values;
- `fold`: `features.fold_rows` over the rows of the chunk (16 frames), what the NAMM does with them.

How much the rows cost against the fused kernel depends on the CPU: with bf16 matrix
instructions (AMX) the fused kernel is far faster than an eager pass that writes every
probability, and every timing here is the machine's (the result file's header names it).
Each time is the median of `--repeats` batches of `--calls` calls, the ways interleaved.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import attention  # noqa: E402
from namm_core.attention import namm_attention_forward  # noqa: E402
from namm_core.cache import MemoryCache  # noqa: E402
from namm_core.features import SpectrogramConfig, fold_rows  # noqa: E402
from namm_core.models import tiny_random_config  # noqa: E402

HEADS_KV, GROUP, HEAD_DIM, CHUNK = 3, 3, 64, 256


class _Layer:
    layer_idx = 0


def chunk_on_cache(cached: int, dtype: torch.dtype, seed: int = 0):
    """(cache, query): one layer holding `cached` old slots plus the chunk's own keys."""
    g = torch.Generator().manual_seed(seed)
    config, _ = tiny_random_config("llama")
    cache = MemoryCache(config)
    layer = cache.layers[0]
    total = cached + CHUNK
    positions = torch.arange(total).view(1, total)
    valid = torch.ones(1, total, dtype=torch.bool)
    keys = torch.randn(1, HEADS_KV, total, HEAD_DIM, generator=g).to(dtype)
    values = torch.randn(1, HEADS_KV, total, HEAD_DIM, generator=g).to(dtype)
    layer.append(keys, values, positions, valid, positions.clone(), {})
    chunk = positions[:, cached:]
    cache.set_chunk(chunk, valid[:, cached:], chunk.clone())
    query = torch.randn(1, HEADS_KV * GROUP, CHUNK, HEAD_DIM, generator=g).to(dtype)
    return cache, query


def ways(cached: int, dtype: torch.dtype) -> dict:
    seen = []
    spec = SpectrogramConfig()

    def attend(observe: bool, capture: str = "inline", rows_dtype=torch.float32):
        # a cache of its own per way (the same inputs): a cache reallocates its rows buffer when
        # the rows' dtype changes, which a generation does once, not at every call
        cache, query = chunk_on_cache(cached, dtype)
        layer = cache.layers[0]

        def run():
            cache.observer = (lambda i, lay, rows: seen.append(rows)) if observe else None
            cache.row_capture, cache.observe_dtype = capture, rows_dtype
            with cache.active():
                namm_attention_forward(_Layer(), query, layer.keys, layer.values, None)
            seen.clear()
        return run

    S = cached + CHUNK
    rows = torch.rand(1, HEADS_KV, CHUNK, S, generator=torch.Generator().manual_seed(1))
    first_frame = torch.zeros(1, HEADS_KV, S, dtype=torch.long)
    first_frame[..., -CHUNK:] = torch.arange(CHUNK) // spec.hop
    state = torch.zeros(1, HEADS_KV, S, spec.n_freq)

    def fold(dtype):
        r, carry = rows.to(dtype), torch.zeros(1, HEADS_KV, spec.carry, S, dtype=dtype)
        return lambda: fold_rows(state, carry, r, first_frame, spec)

    return {
        "fused": attend(False),
        "inline": attend(True),
        "inline, rows bf16": attend(True, rows_dtype=torch.bfloat16),
        "separate": attend(True, "separate"),
        "fold (float32 rows)": fold(torch.float32),
        "fold (bf16 rows)": fold(torch.bfloat16),
    }


def measure(fns: dict, calls: int, repeats: int) -> dict:
    for fn in fns.values():
        fn()                                            # warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():                    # interleaved: a drift hits every way
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cached", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="old slots in the cache before the chunk (a quarter of 4k, 8k, 16k tokens)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                   help="the model's dtype (queries, keys, values)")
    p.add_argument("--block-mb", type=float, default=None,
                   help="the eager attention's block of probabilities on CPU, in MB (default: the library's, "
                        "attention.EAGER_BLOCK_BYTES)")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "row_capture.md")
    args = p.parse_args(argv)
    if args.block_mb is not None:
        attention.EAGER_BLOCK_BYTES = int(args.block_mb * (1 << 20))
    table = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for cached in args.cached:
            times = measure(ways(cached, dtype), args.calls, args.repeats)
            fused = times["fused"]
            for name, seconds in times.items():
                table.append((dtype_name, cached + CHUNK, name, f"{seconds * 1e3:.2f}", f"{seconds / fused:.2f}"))
            print(f"{dtype_name} S={cached + CHUNK}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()),
                  flush=True)
    text = (f"One layer, a chunk of {CHUNK} queries ({HEADS_KV * GROUP} query heads over {HEADS_KV} KV heads, head "
            f"dim {HEAD_DIM}) over S slots, eager blocks of {attention.EAGER_BLOCK_BYTES / (1 << 20):g} MB of "
            f"probabilities, {torch.get_num_threads()} threads; milliseconds per call (median of "
            f"{args.repeats} batches of {args.calls}), and over the fused kernel's time on the same inputs. "
            "The fold's rows are the chunk's rows as the NAMM receives them (3 KV heads).\n\n"
            + markdown_table(("model dtype", "S", "way", "ms", "/ fused"), table) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
