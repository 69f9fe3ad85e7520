"""`namm eval`: every policy on the same prompts; a table, parquet rows and a plot."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate memory policies (NAMMs and baselines) on long-context tasks at equal cache size"
EPILOG = """examples:
  namm eval --policy full --policy h2o:0.25 --policy namm:namms/smollm2 --tasks passkey,vt --num-prompts 20
  namm eval --policy namm --baselines-at-namm-retention --tasks niah_single,kv_retrieval,my_longbench.jsonl

policies: full | streamingllm:B | h2o:B | l2:B | snapkv:B | tova:B | namm[:DIR]
  B is a fraction of the tokens seen (0.25) or a token count (1024); a NAMM decides its own
  budget and its achieved retention is reported.
tasks: synthetic names (see `namm eval --list-tasks`), `fidelity` (agreement with the full cache
  on plain text, for any model), or LongBench-format .jsonl/.parquet files.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, default), 'gemma3-270m', a hub id or path")
    p.add_argument("--policy", action="append", default=None, help="a memory policy; repeatable (default: full)")
    p.add_argument("--baselines-at-namm-retention", action="store_true",
                   help="also run every baseline at the first NAMM's own mean retention (on full-attention layers)")
    p.add_argument("--tasks", default="passkey,niah_single,vt,kv_retrieval",
                   help="comma-separated task names and/or task files")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--num-prompts", type=int, default=10, help="prompts per task")
    p.add_argument("--context-length", type=int, default=4096, help="synthetic prompt length in model tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--templates", help="JSON file of prompt templates per dataset (e.g. LongBench's dataset2prompt.json)")
    p.add_argument("--update-every", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=Path("results/eval.parquet"),
                   help="parquet file (one row per prompt and policy); the plot and table go beside it")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from namm_core import NAMM, BASELINES, load_model, parse_policy
    from workers.evaluator import Evaluator
    from workers.report import format_table, namm_matched_budget, plot_score_vs_retention, write_parquet_atomic
    from workers.tasks import load_tasks, task_names

    if args.list_tasks:
        print("\n".join(task_names()))
        return 0
    specs = args.policy or ["full"]
    policies = [parse_policy(s) for s in specs]  # bad specs fail before the model loads
    if args.baselines_at_namm_retention and not any(isinstance(p, NAMM) for p in policies):
        raise ValueError("--baselines-at-namm-retention needs a --policy namm[:DIR]")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    samples = load_tasks(args.tasks.split(","), tokenizer, args.num_prompts, args.context_length, args.seed,
                         templates_file=args.templates)
    evaluator = Evaluator(model, tokenizer, update_every=args.update_every, chunk_size=args.chunk_size)

    rows = []
    total = len(samples) * (len(policies) + (len(BASELINES) - 1 if args.baselines_at_namm_retention else 0))
    with tqdm(total=total, desc="eval", unit="prompt") as bar:
        def tick(result):
            bar.set_postfix_str(f"{result.policy} {result.task} score={result.score:.2f}")
            bar.update(1)

        for policy in policies:
            rows += [r.to_row() for r in evaluator.evaluate(samples, policy, progress=tick)]
        if args.baselines_at_namm_retention:
            namm_label = next(p.describe() for p in policies if isinstance(p, NAMM))
            retention, fraction = namm_matched_budget(model, [r for r in rows if r["policy"] == namm_label])
            bar.write(f"NAMM retention {retention:.3f} on full-attention layers: baselines at {fraction}")
            for name in BASELINES:
                if name != "full":
                    rows += [r.to_row() for r in evaluator.evaluate(samples, parse_policy(f"{name}:{fraction}"),
                                                                    progress=tick)]
    for row in rows:
        row["model"] = args.model
        row["context_length"] = args.context_length
        row["seed"] = args.seed
    out = write_parquet_atomic(rows, args.out)
    table = format_table(rows)
    plot = plot_score_vs_retention(rows, out.with_suffix(".png"),
                                   title=f"{args.model}, {args.context_length} tokens, {len(samples)} prompts")
    out.with_suffix(".md").write_text(format_table(rows, markdown=True) + "\n")
    print(table)
    cropped = sum(1 for r in rows if r["cropped_tokens"])
    if cropped:
        print(f"note: {cropped} prompt runs were cropped in the middle to fit the model window")
    print(f"wrote {out}, {plot}, {out.with_suffix('.md')}")
    return 0
