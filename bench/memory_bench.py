"""Speed and KV memory of every policy on the embedded model, as ratios to the full cache.

    .venv/bin/python bench/memory_bench.py                 # 2k, 4k, 8k tokens (~20 min on 2 CPU cores)
    .venv/bin/python bench/memory_bench.py --lengths 2048  # quicker

Each run is a prefill of N tokens plus 32 greedy decoded tokens. Writes a markdown table to
bench/results/memory.md. The `namm (zero)` row keeps everything: the worst case for the NAMM's
own overhead (features + scoring), reported as a share of the forward time. The `namm
(shipped)` row is the evolved NAMM in namms/smollm2 (when present), at its own retention.
`--policies` with no names runs only the full cache and the NAMM rows.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, MemoryManagedLM, budgeted_baselines, load_model, parse_policy  # noqa: E402


def make_ids(tokenizer, n_tokens: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    words = ("the river carried stone lamps past a garden where a window opened on the market and a letter "
             "of silver light waited for morning at the harbor").split()
    text = " ".join(rng.choice(words) for _ in range(n_tokens * 2))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--budgets", nargs="+", default=["0.25", "0.5"])
    p.add_argument("--policies", nargs="*", default=budgeted_baselines())
    p.add_argument("--fastgen", nargs="*", default=["0.85"], help="FastGen recovery thresholds (no budget)")
    p.add_argument("--namm", type=Path, default=ROOT / "namms" / "smollm2", help="an evolved NAMM for its own row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.md")
    args = p.parse_args(argv)

    model, tok = load_model(args.model)
    runs = [("full", parse_policy("full"))]
    runs += [(f"{name}:{b}", parse_policy(f"{name}:{b}")) for name in args.policies for b in args.budgets]
    runs += [(f"fastgen:{t}", parse_policy(f"fastgen:{t}")) for t in args.fastgen]
    runs.append(("namm (zero)", NAMM()))
    if (args.namm / "namm_config.json").is_file():
        runs.append(("namm (shipped)", NAMM.from_pretrained(args.namm)))
    rows = []
    MemoryManagedLM(model, NAMM()).generate(make_ids(tok, 600), max_new_tokens=2)  # warm-up
    bar = tqdm(total=len(args.lengths) * len(runs), desc="bench")
    for n in args.lengths:
        ids = make_ids(tok, n)
        results = {}
        for label, policy in runs:
            lm = MemoryManagedLM(model, policy, tokenizer=tok)
            t = time.perf_counter()
            out = lm.generate(ids, max_new_tokens=args.new_tokens)
            wall = time.perf_counter() - t
            results[label] = (wall, out.stats)
            bar.update(1)
        full_wall, full_stats = results["full"]
        for label, (wall, s) in results.items():
            forward = max(wall - s.policy_seconds, 1e-9)   # everything but the policy's own code
            rows.append((n, label, f"{s.mean_retention:.3f}", f"{wall:.1f}", f"{wall / full_wall:.2f}",
                         f"{s.peak_kv_bytes / 2**20:.1f}", f"{s.peak_kv_bytes / full_stats.peak_kv_bytes:.2f}",
                         f"{s.final_kv_bytes / full_stats.final_kv_bytes:.2f}",
                         f"{100 * s.observe_seconds / forward:.1f}%", f"{100 * s.select_seconds / forward:.1f}%",
                         f"{100 * s.policy_seconds / forward:.1f}%"))
    bar.close()
    header = ("tokens", "policy", "retention", "seconds", "time / full", "peak KV MiB", "peak KV / full",
              "final KV / full", "observe", "select", "policy overhead")
    device = next(model.parameters()).device
    table = (f"Model `{args.model}`, {device}, {torch.get_num_threads()} threads; prefill + {args.new_tokens} "
             f"decoded tokens; memory update every 512 tokens.\n"
             "`observe` = time folding attention into the policy's statistics (NAMM: spectrogram features), "
             "`select` = scoring and eviction (NAMM: BAM scorer), `policy overhead` = both; each as a share of "
             "the rest of the same run (the forward passes).\n\n"
             + markdown_table(header, rows) + "\n")
    write_result(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
