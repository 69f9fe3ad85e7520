"""Speed and KV memory of the NAMM against the full cache and StreamingLLM at the NAMM's budgets,
from 1k to 16k tokens on the embedded model, as ratios measured in one run.

    .venv/bin/python bench/memory_bench.py                          # 1k-16k tokens (~40 min on 2 CPU cores)
    .venv/bin/python bench/memory_bench.py --lengths 2048 4096      # quicker
    .venv/bin/python bench/memory_bench.py --policies h2o tova      # more baselines beside StreamingLLM
    .venv/bin/python bench/memory_bench.py --repeats 3              # the median of 3 rounds per row

On a shared machine one generation's time can move by 10-20% from run to run. With `--repeats R`
every length runs R rounds of all its policies, each round in another order (rotated), and each
row reports the round with the median time and the spread of the R times beside it.

Each run is a prefill of N tokens plus 64 greedy decoded tokens, every policy with the shipped
NAMM's memory settings (an update and a chunk every 256 tokens). Rows: the full cache; at each
budget B, StreamingLLM and the other `--policies` at B, the shipped NAMM at B (`namm@B`) and each
`--namm-variants` of it (e.g. `layers=6`: it scores from six layers, the others attend with the
fused kernel). Columns: seconds (prefill, decode tokens per second), time over the full cache's and
over StreamingLLM's at the same budget, peak KV over the full cache's and over the retention (1.00:
the peak is what the policy keeps), and the policy's own share of the run. Writes
bench/results/memory.md.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import MemoryManagedLM, load_model, parse_policy  # noqa: E402
from namm_core.models import cpu_has_bf16  # noqa: E402


def make_ids(tokenizer, n_tokens: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    words = ("the river carried stone lamps past a garden where a window opened on the market and a letter "
             "of silver light waited for morning at the harbor").split()
    text = " ".join(rng.choice(words) for _ in range(n_tokens * 2))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def rotated(items: list, by: int) -> list:
    """`items` starting at position `by` (mod its length): round r of a repeated bench runs the
    policies in this order, so no policy always runs first or last."""
    k = by % len(items)
    return items[k:] + items[:k]


def median_run(stats: list):
    """The run with the median time (the lower middle one of an even count)."""
    return sorted(stats, key=lambda s: s.seconds)[(len(stats) - 1) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--budgets", nargs="+", default=["0.25", "0.5"])
    p.add_argument("--policies", nargs="*", default=[], help="baselines besides StreamingLLM, at each budget")
    p.add_argument("--namm", default="namm", help="the NAMM (a policy spec without budget: namm, namm:DIR)")
    p.add_argument("--namm-variants", nargs="*", default=["window=256"],
                   help="options of the NAMM for extra rows, e.g. window=256 (namm@B/window=256, the "
                        "variant that ties the NAMM on the design seed's board), layers=6, rows=64")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights (default: bfloat16 where the CPU has bf16 instructions or on CUDA, else float32, "
                        "as the board)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per length (each in another policy order); rows report the median round")
    p.add_argument("--update-every", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.md")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")

    if args.dtype is None:
        args.dtype = "bfloat16" if cpu_has_bf16() or torch.cuda.is_available() else "float32"
    model, tok = load_model(args.model, dtype=args.dtype)
    runs = [("full", None)]
    for b in args.budgets:
        runs += [(f"{name}:{b}", b) for name in ["streamingllm", *args.policies]]
        runs += [(f"{args.namm}@{b}", b)] + [(f"{args.namm}@{b}/{v}", b) for v in args.namm_variants]
    policies = {label: parse_policy(label) for label, _ in runs}
    settings = dict(update_every=args.update_every, chunk_size=args.chunk_size, tokenizer=tok)
    MemoryManagedLM(model, policies[runs[-1][0]], **settings).generate(make_ids(tok, 600), max_new_tokens=2)  # warm-up
    rows = []
    bar = tqdm(total=len(args.lengths) * len(runs) * args.repeats, desc="bench")
    for n in args.lengths:
        ids = make_ids(tok, n)
        results: dict = {label: [] for label, _ in runs}
        for round_ in range(args.repeats):
            for label, _ in rotated(runs, round_):
                bar.set_postfix_str(f"{n} tokens, {label}" + (f", round {round_ + 1}" if args.repeats > 1 else ""))
                out = MemoryManagedLM(model, policies[label], **settings).generate(ids, max_new_tokens=args.new_tokens)
                results[label].append(out.stats)
                bar.update(1)
        median = {label: median_run(stats) for label, stats in results.items()}
        full = median["full"]
        for label, budget in runs:
            s = median[label]
            streaming = median.get(f"streamingllm:{budget}")
            forward = max(s.seconds - s.policy_seconds, 1e-9)   # everything but the policy's own code
            spread = [f"{min(r.seconds for r in results[label]):.1f}-{max(r.seconds for r in results[label]):.1f}"] \
                if args.repeats > 1 else []
            rows.append((n, label, f"{s.mean_retention:.3f}", f"{s.seconds:.1f}", *spread, f"{s.prefill_seconds:.1f}",
                         f"{args.new_tokens / max(s.decode_seconds, 1e-9):.1f}", f"{s.seconds / full.seconds:.2f}",
                         f"{s.seconds / streaming.seconds:.2f}" if streaming else "",
                         f"{s.peak_kv_bytes / 2**20:.1f}", f"{s.peak_kv_bytes / full.peak_kv_bytes:.2f}",
                         f"{s.peak_kv_bytes / full.peak_kv_bytes / s.mean_retention:.2f}",
                         f"{100 * s.policy_seconds / forward:.1f}%"))
    bar.close()
    header = ("tokens", "policy", "retention", "seconds", *(["seconds (all rounds)"] if args.repeats > 1 else []),
              "prefill s", "decode tok/s", "time / full",
              "time / streamingllm", "peak KV MiB", "peak KV / full", "peak KV / retention", "policy share")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rounds = (f" Each row: the median of {args.repeats} rounds (each round runs every policy, in an order "
              "rotated from round to round); ratios between medians." if args.repeats > 1 else "")
    table = (f"Model `{args.model}` ({dtype}), {device}, {torch.get_num_threads()} threads; prefill + {args.new_tokens} "
             f"decoded tokens; every policy with an update and a chunk every {args.update_every} / "
             f"{args.chunk_size} tokens. `time / streamingllm`: over StreamingLLM at the same budget. "
             "`peak KV / retention`: the peak over the full cache's, divided by the final retention "
             "(1.00: the cache never held more than what is kept). `policy share`: the policy's own code "
             "(observe + select) over the rest of the same run." + rounds + "\n\n"
             + markdown_table(header, rows) + "\n")
    write_result(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
