"""What each evolution lever adds over the distilled warm start it starts from: one row per run.

Each lever is an evolution run (a config under jobs/levers/) started from the same warm start
(`es.start`), on the same prompts per generation (the same sampler seed). Its exported NAMM (the
best validated CMA mean) and the warm start run on one board of held-out prompts (a seed used for
nothing else); this script reads that board and the runs' checkpoints and writes one row per
lever: the config, what the search saw (dimensions, candidates evaluated, wall time), its best
validation fitness, and its paired difference with the warm start on the board, per cell.

    .venv/bin/python bench/evolution_levers.py --board bench/results/levers_board.parquet \\
        --warm-start namms/smollm2-warm-start \\
        --lever jobs/levers/per_prompt_rank.yaml=namms/levers/lever-per-prompt-rank ...

`--lever CONFIG=NAMM_DIR` (the run directory comes from the config; a NAMM exported with
`--which start` is the run's starting mean, a row without search); `--reference NAMM_DIR`
adds a NAMM without a run here (its row names its model card, or the `namm adapt` that wrote it). Writes
bench/results/evolution_levers.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_eval import report  # noqa: E402


def run_facts(config_path: str) -> dict:
    """Dimensions searched, candidates evaluated, wall time and validation of a lever's run."""
    from orchestrator import checkpoint as ckpt
    from orchestrator.config import load_config
    from orchestrator.state import EvolutionState

    cfg = load_config(config_path, check_files=False)
    found = ckpt.load_latest(cfg.run_dir / "checkpoints")
    if found is None:
        raise SystemExit(f"{config_path}: no checkpoint under {cfg.run_dir / 'checkpoints'}: run the lever first")
    state = EvolutionState.from_payload(found[1], where=str(found[0]))
    seconds = sum(m["metrics"]["generation_seconds"] for m in state.metrics_log)
    space = state.es.subspace.describe() if state.es.subspace is not None else "every parameter"
    fitness = cfg.fitness.kind + ("" if cfg.fitness.per_prompt == "none" else f", per prompt: {cfg.fitness.per_prompt}")
    if cfg.transfer_models:
        fitness += f", mean over {', '.join(m.label for m in cfg.models)}"
    warm = state.warm_start or {}
    start = (f"es.start {shown(cfg.es.start)}" if cfg.es.start else
             f"distilled from {warm['imitate']} ({warm.get('total_seconds', warm.get('seconds', 0)) / 60:.0f} min)"
             if warm else "zero")
    return {"config": config_path, "start": start,
            "search": f"{space} ({state.es.search_dim} dims), sigma0 {cfg.es.sigma0}",
            "fitness": fitness, "candidates": len(state.history), "minutes": seconds / 60,
            "validation": ", ".join(validated(v) for v in state.validation),
            "start_validation": next((validated(v) for v in state.validation if v["generation"] == -1), "")}


def validated(v: dict) -> str:
    """"0.650 (gen 2)", or with transfer models "0.650 (gen 2; smollm2 0.700, gemma3-270m 0.600)"."""
    on = "".join(f", {k[len('fitness@'):]} {x:.3f}" for k, x in v.items() if k.startswith("fitness@"))
    return f"{v['fitness']:.3f} (gen {v['generation']}{'; ' + on[2:] if on else ''})"


def shown(path: str) -> str:
    """A path as the project names it (relative to the checkout when inside it)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def adapted_facts(namm_dir: str) -> dict | None:
    """A NAMM written by `namm adapt` (statistics collected again on another model): its row's facts."""
    import json

    config = Path(namm_dir) / "namm_config.json"
    stats = json.loads(config.read_text()).get("metadata", {}).get("statistics") if config.exists() else None
    if not stats:
        return None
    return {"config": f"`namm adapt {stats['adapted_from']} --model {stats['model']}`",
            "start": shown(stats["adapted_from"]),
            "search": f"none: statistics from {stats['prompts_per_task']} prompts per task on {stats['model']}",
            "candidates": 0}


def is_start_export(namm_dir: str) -> bool:
    """A NAMM exported with `namm export --which start`: the run's starting mean, before evolution."""
    import json

    config = Path(namm_dir) / "namm_config.json"
    return config.exists() and json.loads(config.read_text()).get("metadata", {}).get("which") == "start"


def held_out(rows: list[dict], lever: str, warm_start: str) -> dict[str, dict]:
    """Per board section: the lever's paired difference with the warm start (same prompts)."""
    out = {}
    sections = sorted({(r["model"], r["context_length"], r["protocol"]) for r in rows})
    for model, length, protocol in sections:
        section = [r for r in rows if (r["model"], r["context_length"], r["protocol"]) == (model, length, protocol)]
        budgets = sorted({r["policy"].rsplit("@", 1)[1] for r in section if r["policy"].startswith(f"namm:{lever}@")})
        for budget in budgets:
            diff = report.paired_difference(section, f"namm:{lever}@{budget}", f"namm:{warm_start}@{budget}")
            out[f"{model} {length} @{budget}"] = diff
    return out


def fmt(diff: dict) -> str:
    return f"{diff['verdict']} ({diff['difference']:+.3f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}], n={diff['prompts']})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--board", required=True, action="append",
                   help="the held-out board's parquet (bench/namm_board.py); repeatable: boards of other cells")
    p.add_argument("--warm-start", required=True, help="the warm start's NAMM directory as the board names it")
    p.add_argument("--lever", action="append", default=[], help="CONFIG=NAMM_DIR, one per lever")
    p.add_argument("--reference", action="append", default=[], help="a NAMM directory evolved elsewhere")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "evolution_levers.md"))
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    rows = [r for board in args.board for r in pq.read_table(board).to_pylist() if (r.get("kind") or "score") == "score"]
    seeds = sorted({r["seed"] for r in rows})
    table, cells = [], []
    entries = [(None, ref) for ref in args.reference] + [tuple(x.split("=", 1)) for x in args.lever]
    diffs_of = {namm_dir: held_out(rows, namm_dir, args.warm_start) for _, namm_dir in entries}
    for diffs in diffs_of.values():   # every cell any NAMM was run in, in board order
        cells += [c for c in diffs if c not in cells]
    for config, namm_dir in entries:
        facts = run_facts(config) if config else (adapted_facts(namm_dir) or
                                                  {"config": f"{namm_dir}/README.md (its model card)"})
        if config and is_start_export(namm_dir):   # the run's start: no search, its own validation only
            facts = {"config": facts["config"], "start": facts["start"], "search": "none (the starting mean)",
                     "fitness": "", "candidates": 0, "validation": facts["start_validation"]}
        diffs = diffs_of[namm_dir]
        table.append([namm_dir, facts["config"], facts.get("start", ""), facts.get("search", ""),
                      facts.get("fitness", ""),
                      str(facts.get("candidates", "")),
                      f"{facts['minutes']:.0f}" if "minutes" in facts else "",
                      facts.get("validation", "")] + [fmt(diffs[c]) if c in diffs else "" for c in cells])
    header = ["NAMM", "config", "start", "search", "fitness", "candidates", "minutes", "validation fitness of the CMA mean"]
    header += [f"vs warm start, {c}" for c in cells]
    boards = ", ".join(f"`{b}`" for b in args.board)
    text = (f"Each lever's evolved NAMM (its best validated CMA mean; for a lever with a start of its own, "
            f"that start too) against the shipped warm start, "
            f"paired on the same held-out prompts (board {boards}, seed {', '.join(map(str, seeds))}; tie: "
            f"the 95% interval holds 0). Candidates: evaluated by CMA-ES; minutes: the generations' wall time "
            f"on 2 CPU cores.\n\n" + markdown_table(header, table))
    write_result(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
