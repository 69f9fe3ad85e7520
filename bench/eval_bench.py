"""The board the evolved NAMM is judged on: the synthetic suite at 2k and 4k tokens, the full
cache and every baseline at 25% and 50% of the cache, on the embedded SmolLM2.

    .venv/bin/python bench/eval_bench.py                         # ~30-40 min on 2 CPU cores
    .venv/bin/python bench/eval_bench.py --lengths 2048 --num-prompts 2

Writes bench/results/eval.md (a score table per length), eval.parquet and eval_<length>.png.
Add `--policy namm:DIR` to put a NAMM on the board.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from namm_core import budgeted_baselines, load_model, parse_policy  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.report import format_table, plot_score_vs_retention, write_parquet_atomic  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402

BASELINES = budgeted_baselines()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--budgets", nargs="+", default=["0.25", "0.5"])
    p.add_argument("--policy", action="append", default=[], help="extra policies (e.g. namm:DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    specs = ["full"] + [f"{b}:{x}" for b in BASELINES for x in args.budgets] + args.policy
    model, tok = load_model(args.model)
    rows, sections = [], []
    for length in args.lengths:
        samples = load_tasks(args.tasks.split(","), tok, args.num_prompts, length, args.seed)
        ev = Evaluator(model, tok)
        part = []
        for spec in tqdm(specs, desc=f"{length} tokens", unit="policy"):
            part += [dict(r.to_row(), context_length=length) for r in ev.evaluate(samples, parse_policy(spec))]
        rows += part
        plot_score_vs_retention(part, args.out_dir / f"eval_{length}.png",
                                title=f"{args.model}, {length} tokens, {len(samples)} prompts")
        sections.append(f"#### {length} tokens ({args.num_prompts} prompts per task, seed {args.seed})\n\n"
                        + format_table(part, markdown=True))
        # written after every length, so a long run leaves its finished part behind
        write_parquet_atomic(rows, args.out_dir / "eval.parquet")
        text = "\n\n".join(sections) + "\n"
        (args.out_dir / "eval.md").write_text(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
