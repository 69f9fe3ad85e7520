"""`namm adapt NAMM_DIR OUT_DIR --model M`: the NAMM with normalisation statistics collected on M."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "re-collect a NAMM's normalisation statistics on another model (no answers needed; weights unchanged)"
EPILOG = """A NAMM normalises its features with statistics collected on the model it was evolved on. On
another model the features have other scales; this command reads prompts with the full cache on
that model, as evolution did on its own, and writes the NAMM with the new statistics (its scorer
unchanged; the metadata says where they came from). The defaults are the shipped NAMM's: its
first stage's tasks, 4 prompts each, 1,024 tokens, seed 0 (evolution's own training prompts).

example:
  namm adapt namms/smollm2 namms/smollm2-on-gemma --model gemma3-270m
  namm eval --model gemma3-270m --policy namm:namms/smollm2-on-gemma --policy namm --context-length 1024
"""
DEFAULT_TASKS = "passkey,niah_single,niah_multikey,niah_multivalue,qa,qa_2hop"


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("namm_dir", type=Path, help="a saved NAMM directory")
    p.add_argument("out_dir", type=Path, help="where the adapted NAMM is written")
    p.add_argument("--model", required=True, help="'gemma3-270m', 'smollm2', a hub id or a local path")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"tasks whose prompts are read (default: {DEFAULT_TASKS})")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per task (default: 4)")
    p.add_argument("--context-length", type=int, default=1024, help="prompt length in tokens (default: 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts (default: 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from namm_core import NAMM, load_model
    from namm_core.generation import resolve_memory_settings
    from namm_eval.evaluator import Evaluator
    from namm_eval.statistics import feature_statistics, with_statistics
    from namm_eval.tasks import load_tasks

    namm = NAMM.from_pretrained(args.namm_dir)     # a bad directory fails before the model loads
    if args.out_dir.resolve() == args.namm_dir.resolve():
        raise ValueError(f"{args.out_dir}: write the adapted NAMM to another directory than {args.namm_dir}")
    update_every, chunk_size = resolve_memory_settings(namm)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    samples = load_tasks(args.tasks.split(","), tokenizer, args.num_prompts, args.context_length, args.seed)
    evaluator = Evaluator(model, tokenizer, update_every=update_every, chunk_size=chunk_size)
    with tqdm(total=len(samples), desc="statistics", unit="prompt") as bar:
        stats = feature_statistics(evaluator, namm.config, samples, progress=lambda s: bar.update(1))
    adapted = with_statistics(namm, stats)
    metadata = dict(getattr(namm, "metadata", {}) or {})
    metadata["statistics"] = {"model": args.model, "tasks": args.tasks, "prompts_per_task": args.num_prompts,
                              "context_length": args.context_length, "seed": args.seed,
                              "adapted_from": str(args.namm_dir)}
    adapted.save_pretrained(args.out_dir, metadata=metadata)
    shift = (adapted.norm_mean - namm.norm_mean).abs().max().item()
    ratio = (adapted.norm_var / namm.norm_var.clamp(min=1e-12)).sqrt()
    print(f"{args.out_dir}: statistics from {len(samples)} prompts on {args.model} ({int(stats['count'])} feature "
          f"vectors); feature std {ratio.min().item():.2f}-{ratio.max().item():.2f}x the old, means moved by up to "
          f"{shift:.3g}")
    return 0
