"""Which fitness picks the better memory for the same compute: each fitness against the board.

Evolution ranks candidates by a fitness measured on a few training prompts; what counts is the task
score on prompts it never saw. This bench measures how often each fitness puts two memories in the
order the board puts them, when both fitnesses get the same CPU time:

1. the full cache and every budgeted policy of one board section (the NAMMs and the baselines at
   one budget) run on training prompts (seed 0, the pool evolution draws from), twice: the task
   score of the decoded reply, and the teacher-forced log-likelihood of the reference answer;
2. many draws of k prompts per task: each policy's fitness as evolution computes it
   (`workers.fitness.candidate_fitness`, "task_score" or "loglik"); the log-likelihood fitness
   gets k x (seconds per decoded prompt / seconds per log-likelihood prompt) prompts, the same time;
3. the pairs of policies the board tells apart (their paired 95% interval on its held-out prompts
   excludes 0): the share each fitness orders as the board does (a tie in fitness counts half).

    .venv/bin/python bench/fitness_agreement.py          # SmolLM2, 1k tokens, budget 0.5 (~15 min on 2 cores)

Needs the board's rows (bench/results/namm_board.parquet) for the same model, length and budget.
Writes bench/results/fitness_agreement.md and fitness_agreement.parquet (resumable).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.namm_board import Cell, CellRunner, fingerprint  # noqa: E402
from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, parse_policy  # noqa: E402
from namm_core.generation import resolve_memory_settings  # noqa: E402
from namm_eval import report  # noqa: E402
from workers.fitness import candidate_fitness  # noqa: E402

KINDS = {"task_score": "score", "loglik": "loglik"}   # fitness kind -> what each prompt needs


def board_section(board: list[dict], model: str, length: int, budget: str) -> tuple[list[dict], list[str]]:
    """The board's rows of one section and its budgeted policies (not the full cache, not FastGen)."""
    rows = [r for r in board if r["model"] == model and r["context_length"] == length]
    policies = sorted({r["policy"] for r in rows if r["policy"].endswith((f":{budget}", f"@{budget}"))})
    if not policies:
        raise SystemExit(f"the board has no policies at budget {budget} for {model} at {length} tokens")
    return rows, policies


def board_orders(rows: list[dict], policies: list[str]) -> dict[tuple[str, str], int]:
    """(a, b) -> +1 when the board finds a better than b beyond the interval, -1 when worse; ties left out."""
    out = {}
    for a, b in itertools.combinations(policies, 2):
        verdict = report.paired_difference(rows, a, b)["verdict"]
        if verdict != "tie":
            out[(a, b)] = 1 if verdict == "better" else -1
    return out


def per_task(rows: list[dict], policy: str) -> dict[str, list[float]]:
    """Task -> the policy's values prompt by prompt (rows come in prompt order)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["policy"] == policy:
            out.setdefault(r["task"], []).append(float(r["score"]))
    return out


def agreement(values: dict[str, dict[str, list[float]]], full: dict[str, list[float]], kind: str, k: int,
              orders: dict[tuple[str, str], int], draws: int, seed: int) -> np.ndarray:
    """Per draw: the share of the board's ordered pairs that the fitness on k prompts per task orders alike."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for d in range(draws):
        picks = {t: rng.choice(len(v), size=k, replace=False) for t, v in full.items()}
        fitness = {p: candidate_fitness(kind, {t: ([v[i] for i in picks[t]], [full[t][i] for i in picks[t]])
                                               for t, v in by_task.items()}, retentions=[])
                   for p, by_task in values.items()}
        hits = [1.0 if np.sign(fitness[a] - fitness[b]) == sign else 0.5 if fitness[a] == fitness[b] else 0.0
                for (a, b), sign in orders.items()]
        out[d] = float(np.mean(hits)) if hits else float("nan")
    return out


def make_policy(label: str):
    """The policy a board label names; a NAMM keeps the label's directory as its name."""
    policy = parse_policy(label)
    if isinstance(policy, NAMM):
        policy.source = label[len("namm:"):].rpartition("@")[0]
    return policy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--board", type=Path, default=ROOT / "bench" / "results" / "namm_board.parquet")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--budget", default="0.5")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--prompts", type=int, default=16, help="training prompts per task (seed 0)")
    p.add_argument("--k", default="1,2,4,8", help="decoded prompts per task per candidate, as in a generation")
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    import pyarrow.parquet as pq

    if not args.board.exists():
        raise SystemExit(f"--board {args.board}: no such file (run bash scripts/board.sh first)")
    os.chdir(ROOT)   # NAMM labels on the board are paths relative to the project
    board = pq.read_table(args.board).to_pylist()
    section, labels = board_section(board, args.model, args.length, args.budget)
    args.dtype = section[0].get("dtype", "float32")
    policies = [make_policy(label) for label in labels]
    for policy in policies:   # the board's NAMM rows must come from these weights
        stored = {r.get("fingerprint") for r in section if r["policy"] == policy.describe()}
        if stored != {fingerprint(policy)}:
            raise SystemExit(f"{policy.describe()}: its weights differ from the board's rows; rerun the board")
    namm = next((q for q in policies if isinstance(q, NAMM)), None)
    update_every, chunk_size = resolve_memory_settings(namm) if namm else (None, None)
    args.seed = 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parquet = args.out_dir / "fitness_agreement.parquet"
    rows = pq.read_table(parquet).to_pylist() if parquet.exists() else []
    cell = Cell(args.model, args.length, [args.budget], args.prompts)
    runner = CellRunner(cell, args, update_every, chunk_size, rows, parquet)
    everything = [parse_policy("full"), *policies]
    results = {}
    with tqdm(total=2 * len(everything) * len(runner.sample_ids), desc="training prompts", unit="prompt") as bar:
        for kind, what in KINDS.items():
            results[kind] = sum(runner.run(everything, bar, kind=what), [])
    runner.close()

    orders = board_orders(section, labels)
    seconds = {kind: float(np.mean([r["seconds"] for r in rs])) for kind, rs in results.items()}
    exchange = seconds["task_score"] / seconds["loglik"]
    values = {kind: {q: per_task(rs, q) for q in labels} for kind, rs in results.items()}
    full = {kind: per_task(rs, "full") for kind, rs in results.items()}
    table = []
    for k in [int(x) for x in args.k.split(",")]:
        k_ll = min(args.prompts, max(1, int(round(k * exchange))))
        task = agreement(values["task_score"], full["task_score"], "task_score", k, orders, args.draws, seed=k)
        ll = agreement(values["loglik"], full["loglik"], "loglik", k_ll, orders, args.draws, seed=k)
        table.append([str(k), str(k_ll), f"{task.mean():.3f} [{np.quantile(task, 0.05):.2f}, {np.quantile(task, 0.95):.2f}]",
                      f"{ll.mean():.3f} [{np.quantile(ll, 0.05):.2f}, {np.quantile(ll, 0.95):.2f}]"])
    held_out = {s["policy"]: s["mean"] for s in report.summarize([r for r in section if r["policy"] in labels])[1]}

    def on_all_prompts(kind: str, policy: str) -> float:
        return candidate_fitness(kind, {t: (v, full[kind][t]) for t, v in values[kind][policy].items()}, [])

    per_policy = [[q, f"{held_out[q]:.3f}", f"{on_all_prompts('task_score', q):.3f}", f"{on_all_prompts('loglik', q):.3f}"]
                  for q in sorted(labels, key=lambda q: -held_out[q])]
    text = (f"{args.model}, {args.length} tokens, budget {args.budget}: {len(labels)} policies, {len(orders)} pairs the "
            f"board tells apart (of {len(labels) * (len(labels) - 1) // 2}); training prompts: {args.prompts} per task "
            f"(seed 0), {args.tasks}; weights in {args.dtype}; updates every {update_every or 'the default number of'} tokens. "
            f"Seconds per prompt: decoded {seconds['task_score']:.2f}, log-likelihood {seconds['loglik']:.2f} "
            f"(exchange rate {exchange:.2f}).\n\n"
            "Share of the board's ordered pairs each fitness orders alike (mean over "
            f"{args.draws} draws of prompts, [5%, 95%] of the draws), at equal compute:\n\n"
            + (markdown_table(["decoded prompts per task", "log-likelihood prompts per task (same seconds)",
                               "task-score fitness", "log-likelihood fitness"], table) if orders
               else "(none: the board tells no two of these policies apart)")
            + f"\n\nEach policy: held-out board score ({sum(r['policy'] == labels[0] for r in section)} prompts) and "
            f"both fitnesses on all {args.prompts} training prompts per task:\n\n"
            + markdown_table(["policy", "board score", "task-score fitness", "log-likelihood fitness"], per_policy)
            + "\n")
    write_result(args.out_dir / "fitness_agreement.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
