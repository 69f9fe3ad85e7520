"""The board: a NAMM against the full cache and every baseline at equal cache size, on held-out prompts.

Each cell is a model, a prompt length, one or more budgets and a number of prompts per task:

    bash scripts/board.sh                      # the default board (hours on 2 CPU cores; resumable)
    .venv/bin/python bench/namm_board.py --cell smollm2:1024:0.5:4     # a small one

For every cell: the full cache, then for every budget B the NAMM with exactly B of the cache
(`namm@B`: its B best-scored tokens per layer and KV head) and StreamingLLM, H2O, L2, SnapKV and
TOVA at B, all on the same prompts (seed 7: never used in evolution, whose training prompts come
from seed 0 and its validation prompts from a separate seed). A NAMM saved with the score >= 0
rule (no budget) runs as saved and the baselines get its measured retention instead. FastGen
has no budget to match (its retention follows from its threshold T): it runs once per cell at
T = 0.85 and is listed with its own retention. The NAMM is used unchanged on every model
(Gemma-3-270M is zero-shot transfer).

Every table gives each mean over tasks with a bootstrap 95% interval over prompts, and the NAMM
against each other policy paired on the same prompts: a difference whose interval holds 0 is a
tie. Rows are written to the parquet file after every policy and reused when the same command
runs again, so an interrupted board resumes where it stopped.

Writes bench/results/namm_board.md, namm_board.parquet and namm_board_<model>_<length>.png.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from namm_core import NAMM, budgeted_baselines, load_model, parse_policy  # noqa: E402
from namm_core.files import write_text_atomic  # noqa: E402
from namm_core.policies import Budget  # noqa: E402
from namm_eval import report  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402

BASELINES = budgeted_baselines()
FASTGEN = "fastgen:0.85"
DEFAULT_CELLS = ["smollm2:1024:0.5,0.25:24", "smollm2:2048:0.5:12", "gemma3-270m:1024:0.5:24"]


@dataclass
class Cell:
    model: str
    length: int
    budgets: list[str]
    prompts: int

    @staticmethod
    def parse(text: str) -> "Cell":
        try:
            model, length, budgets, prompts = text.split(":")
            return Cell(model, int(length), [str(Budget.parse(b)) for b in budgets.split(",")], int(prompts))
        except ValueError as e:
            raise SystemExit(f"--cell {text!r}: expected MODEL:LENGTH:B1[,B2...]:PROMPTS_PER_TASK ({e})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namm", type=Path, default=ROOT / "namms" / "smollm2", help="the NAMM directory")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another NAMM directory run at the same budgets (e.g. the warm start the NAMM was evolved "
                        "from); repeatable")
    p.add_argument("--cell", action="append", help=f"MODEL:LENGTH:BUDGETS:PROMPTS, repeatable (default: {DEFAULT_CELLS})")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--seed", type=int, default=7, help="prompt seed (evolution uses seed 0 and its validation seed)")
    p.add_argument("--update-every", type=int, default=None, help="default: the NAMM's recorded interval")
    p.add_argument("--chunk-size", type=int, default=None, help="default: the NAMM's recorded chunk size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="namm_board", help="file name stem of the results")
    args = p.parse_args(argv)
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(args.threads)
    cells = [Cell.parse(c) for c in (args.cell or DEFAULT_CELLS)]
    def load(directory: Path) -> NAMM:
        loaded = NAMM.from_pretrained(directory)
        resolved = directory.resolve()
        loaded.source = str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(directory)
        return loaded

    namm, others = load(args.namm), [load(d) for d in args.also]
    label = namm.source
    settings = {"update_every": args.update_every, "chunk_size": args.chunk_size}
    from namm_core.generation import resolve_memory_settings

    update_every, chunk_size = resolve_memory_settings(namm, **settings)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parquet = args.out_dir / f"{args.name}.parquet"
    rows = pq.read_table(parquet).to_pylist() if parquet.exists() else []
    done = {(r["model"], r["context_length"], r["policy"], r["sample_id"]) for r in rows}
    sections = []
    for cell in cells:
        model, tok = load_model(cell.model)
        samples = load_tasks(args.tasks.split(","), tok, cell.prompts, cell.length, args.seed)
        ev = Evaluator(model, tok, update_every=update_every, chunk_size=chunk_size)
        total = len(samples) * (2 + len(cell.budgets) * (1 + len(others) + len(BASELINES)))
        with tqdm(total=total, desc=f"{cell.model} {cell.length}", unit="prompt") as bar:
            def run(policy, cell=cell, samples=samples, ev=ev, bar=bar) -> list[dict]:
                out = []
                for sample in samples:
                    key = (cell.model, cell.length, policy.describe(), sample.sample_id)
                    if key not in done:
                        r = ev.run_sample(sample, policy)
                        rows.append(dict(r.to_row(), model=cell.model, context_length=cell.length, seed=args.seed))
                        done.add(key)
                        bar.set_postfix_str(f"{r.policy} {r.task} {r.score:.2f}")
                    bar.update(1)
                    out.append(next(r for r in reversed(rows) if (r["model"], r["context_length"], r["policy"],
                                                                   r["sample_id"]) == key))
                report.write_parquet_atomic(rows, parquet)   # after every policy: an interrupted board resumes
                return out

            full = run(parse_policy("full"))
            fastgen = run(parse_policy(FASTGEN))
            # a score >= 0 NAMM keeps what it keeps: one section, the baselines at its retention
            as_saved = namm.config.budget is None and namm.config.selection == "threshold"
            for budget in cell.budgets[:1] if as_saved else cell.budgets:
                if as_saved:
                    budgeted = namm      # a score >= 0 NAMM: the baselines get its retention
                    part = run(budgeted)
                    retention, matched = report.namm_matched_budget(model, part)
                    budget = str(matched)
                else:
                    budgeted = namm.with_budget(budget)
                    part = run(budgeted)
                for other in others:
                    part += run(other.with_budget(budget))
                for name in BASELINES:
                    part += run(parse_policy(f"{name}:{budget}"))
                table_rows = full + part + fastgen
                title = f"{cell.model}, {cell.length} tokens, budget {budget}, {len(samples)} held-out prompts"
                plot = args.out_dir / f"{args.name}_{cell.model}_{cell.length}_{budget}.png"
                report.plot_score_vs_retention(table_rows, plot, title=title)
                sections.append(
                    f"### {cell.model}, {cell.length} tokens, {budget} of the cache ({cell.prompts} prompts per task, "
                    f"seed {args.seed}; updates every {update_every} tokens)\n\n"
                    + report.format_table(table_rows, markdown=True) + "\n\n"
                    + f"{budgeted.describe()} against each policy, paired on the same prompts:\n\n"
                    + report.format_comparisons(table_rows, budgeted.describe(), markdown=True)
                    + f"\n\n![{title}]({plot.name})\n")
                also = "".join(f" Also: `{o.source}`." for o in others)
                text = (report.result_header() + f"\nNAMM: `{label}`.{also} FastGen (T = 0.85) keeps what its rule needs; its "
                        "retention is its own, not the budget.\n\n" + "\n".join(sections))
                write_text_atomic(args.out_dir / f"{args.name}.md", text)
        del model
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
