"""`namm eval`: every policy on the same prompts; a table, parquet rows and a plot."""
from __future__ import annotations

import argparse
from pathlib import Path

# namm_core.generation.ROW_CAPTURES, written out so that --help needs no torch (a test keeps them equal)
ROW_CAPTURE_CHOICES = ("inline", "separate")
HELP = "evaluate memory policies (NAMMs and baselines) on long-context tasks at equal cache size"
EPILOG = """examples:
  namm eval --policy full --policy h2o:0.25 --policy namm:namms/smollm2 --tasks passkey,vt --num-prompts 20
  namm eval --policy namm --baselines-at-namm-retention --tasks niah_single,kv_retrieval,my_longbench.jsonl

policies: {policies}
  B is a fraction of the tokens seen (0.25) or a token count (1024). A NAMM keeps what it was
  saved with (score >= 0, or its budget); namm@B keeps its B best-scored tokens. Options follow
  '/': tova:0.25/global/pool=15/sinks=4, snapkv:0.5/window=64/adakv (see --list-policies).
tasks: synthetic names (see `namm eval --list-tasks`), `fidelity` (agreement with the full cache
  on plain text, for any model), or LongBench-format .jsonl/.parquet files (--num-prompts is per
  dataset in a file holding several; a record may name its `metric`, or give --metric).
memory settings: a NAMM records the update interval and chunk size it was evolved with; without
  --update-every / --chunk-size every policy runs with the first NAMM's (else 512 / 512).
The table gives each mean with a bootstrap 95% interval over prompts; with a NAMM, a second table
  compares it with every other policy on the same prompts (paired): a difference whose interval
  holds 0 is a tie.
"""


def add_parser(sub) -> None:
    from namm_core.registry import REGISTRY

    epilog = EPILOG.replace("{policies}", " | ".join(k.syntax for k in REGISTRY.values()))
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, default), 'gemma3-270m', a hub id or path")
    p.add_argument("--policy", action="append", default=None, help="a memory policy; repeatable (default: full)")
    p.add_argument("--baselines-at-namm-retention", action="store_true",
                   help="also run every budgeted baseline at the first NAMM's cache size: its budget when it keeps a "
                        "fixed share (namm@B, or a NAMM saved with a budget), else its measured mean retention (on "
                        "full-attention layers); FastGen has no budget to match (its retention follows from T) and "
                        "is left out")
    p.add_argument("--tasks", default="passkey,niah_single,vt,kv_retrieval",
                   help="comma-separated task names and/or task files")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--list-policies", action="store_true",
                   help="list the memory policies, what each keeps, their options, and exit")
    p.add_argument("--num-prompts", type=int, default=10, help="prompts per task")
    p.add_argument("--context-length", type=int, default=4096, help="synthetic prompt length in model tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--templates", help="JSON file of prompt templates per dataset (e.g. LongBench's dataset2prompt.json)")
    p.add_argument("--metric", help="score every task file with this metric (e.g. contains_answer) instead of "
                                    "the records' own or LongBench's")
    p.add_argument("--update-every", type=int, default=None,
                   help="run the memory every N tokens (default: the first NAMM's recorded interval, else 512)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk size (default: the first NAMM's recorded size, else 512)")
    p.add_argument("--row-capture", choices=ROW_CAPTURE_CHOICES, default="inline",
                   help="how the attention rows a NAMM (or another policy reading attention) gets are taken: "
                        "inline (an eager attention hands its probabilities over; the faster on CPU) or separate "
                        "(every output from torch's fused kernel, the rows computed apart; meant for GPUs, "
                        "unmeasured there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=Path("results/eval.parquet"),
                   help="parquet file (one row per prompt and policy); the plot and table go beside it")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from namm_core import NAMM, FullCache, budgeted_baselines, load_model, parse_policy
    from namm_core.generation import resolve_memory_settings
    from namm_core.models import pick_device
    from namm_eval import report
    from namm_eval.evaluator import Evaluator
    from namm_eval.tasks import load_tasks, task_names

    if args.list_tasks:
        print("\n".join(task_names()))
        return 0
    if args.list_policies:
        from namm_core.registry import policy_listing

        print(policy_listing())
        return 0
    specs = args.policy or ["full"]
    policies = [parse_policy(s) for s in specs]  # bad specs fail before the model loads
    if not [t for t in args.tasks.split(",") if t.strip()]:
        raise ValueError("--tasks is empty: name at least one task or task file (see --list-tasks)")
    check_writable(args.out)
    pick_device(args.device)
    if args.baselines_at_namm_retention and not any(isinstance(p, NAMM) for p in policies):
        raise ValueError("--baselines-at-namm-retention needs a --policy namm[:DIR]")
    first_namm = next((p for p in policies if isinstance(p, NAMM)), None)
    update_every, chunk_size = resolve_memory_settings(first_namm or FullCache(), args.update_every, args.chunk_size)
    print(f"memory updates every {update_every} tokens, chunks of {chunk_size}"
          + (f" (as {first_namm.describe()} records)" if first_namm and first_namm.memory_settings()
             and args.update_every is None else ""))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    samples = load_tasks(args.tasks.split(","), tokenizer, args.num_prompts, args.context_length, args.seed,
                         templates_file=args.templates, metric=args.metric)
    evaluator = Evaluator(model, tokenizer, update_every=update_every, chunk_size=chunk_size,
                          row_capture=args.row_capture)

    rows = []
    baselines = budgeted_baselines() if args.baselines_at_namm_retention else []
    total = len(samples) * (len(policies) + len(baselines))
    with tqdm(total=total, desc="eval", unit="prompt") as bar:
        def tick(result):
            bar.set_postfix_str(f"{result.policy} {result.task} score={result.score:.2f}")
            bar.update(1)

        for policy in policies:
            rows += [r.to_row() for r in evaluator.evaluate(samples, policy, progress=tick)]
        if args.baselines_at_namm_retention:
            fraction, matched_note = matched_budget(model, first_namm, rows)
            bar.write(matched_note)
            for name in baselines:
                rows += [r.to_row() for r in evaluator.evaluate(samples, parse_policy(f"{name}:{fraction}"),
                                                                progress=tick)]
    for row in rows:
        row["model"] = args.model
        row["context_length"] = args.context_length
        row["seed"] = args.seed
    out = report.write_parquet_atomic(rows, args.out)
    table = report.format_table(rows)
    lengths = sorted(r["prompt_tokens"] for r in rows)
    length = f"{lengths[len(lengths) // 2]} tokens (median prompt; {lengths[0]}-{lengths[-1]})"
    plot = report.plot_score_vs_retention(rows, out.with_suffix(".png"),
                                   title=f"{args.model}, {length}, {len(samples)} prompts")
    markdown = report.result_header() + "\n" + f"{args.model}, {length}, {len(samples)} prompts\n\n" + \
        report.format_table(rows, markdown=True) + "\n"
    if args.baselines_at_namm_retention:
        markdown += "\n" + matched_note + "\n"
        table += "\n" + matched_note
    if first_namm is not None and len(policies) + args.baselines_at_namm_retention > 1:
        comparisons = report.format_comparisons(rows, first_namm.describe())
        markdown += "\n" + report.format_comparisons(rows, first_namm.describe(), markdown=True) + "\n"
        table += "\n\n" + comparisons
    out.with_suffix(".md").write_text(markdown)
    print(table)
    cropped = sum(1 for r in rows if r["cropped_tokens"])
    if cropped:
        print(f"note: {cropped} prompt runs were cropped in the middle to fit the model window")
    print(f"wrote {out}, {plot}, {out.with_suffix('.md')}")
    return 0


def check_writable(out: Path) -> None:
    """Fail before hours of evaluation, not after, when the results cannot be written."""
    import os

    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: directory {parent} is not writable")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a .parquet file name")


def matched_budget(model, namm, rows: list[dict]) -> tuple[str, str]:
    """The budget the baselines get to match `namm`'s cache size, and a line that says how.

    A NAMM with a fixed budget (top-k) keeps exactly that share at every update: the baselines
    get the same budget, as on the board. A score >= 0 NAMM keeps what its scores say: the
    baselines get its measured mean retention on the full-attention layers (sliding-window layers
    evict by their window under every policy alike)."""
    from namm_eval import report

    if namm.config.selection == "top_k" and namm.config.budget is not None:
        return namm.config.budget, f"baselines at the NAMM's budget {namm.config.budget} (it keeps that share at every update)"
    retention, fraction = report.namm_matched_budget(model, [r for r in rows if r["policy"] == namm.describe()])
    return str(fraction), (f"baselines at {fraction}: the NAMM keeps tokens scored >= 0, with a measured mean retention "
                           f"of {retention:.3f} on full-attention layers")
