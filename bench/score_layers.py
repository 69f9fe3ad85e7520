"""Which layers should a model-wide NAMM score from? A data-driven choice of `score_layers`.

A model-wide NAMM keeps one set of tokens, chosen by each token's score averaged over every
layer and KV head. Scoring from fewer layers is cheaper (the others attend with the fused
kernel and keep no spectrogram), but changes the decision. This study runs the NAMM with every
layer voting on prompts the NAMM was trained on (seed 0 by default, never a board's seed), keeps
each layer's votes at every update, and measures, for a subset of layers, how much of the full
decision it reproduces: the share of the tokens the all-layer NAMM keeps (sinks and protected
tokens left out, as both keep them) that the subset keeps too, teacher-forced on the all-layer
run's cache. Layers are then chosen greedily (each step adds the layer that raises the mean
agreement over both budgets most) and compared with the same number of evenly spaced layers
(`layers=K`).

Writes bench/results/score_layers.md and score_layers.png (agreement against the number of
layers). The chosen list is what `namm@B/layers=i,j,...` takes; whether it holds on the board
is a board's question (scripts/namm_variants_board.sh).

    .venv/bin/python bench/score_layers.py --prompts 8
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, load_model  # noqa: E402
from namm_core.namm import scored_layer_indices  # noqa: E402
from namm_core.selection import Votes, collect_votes, decide_from_votes, kept_in_layers  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402


class VoteRecorder(NAMM):
    """The NAMM deciding from every layer, as shipped, and keeping every update's votes."""

    def __init__(self, namm: NAMM):
        super().__init__(replace(namm.config, score_layers=None))   # every layer votes
        self.scorer, self.source = namm.scorer, namm.source
        self.norm_mean, self.norm_var, self.norm_count = namm.norm_mean, namm.norm_var, namm.norm_count
        self.updates: list[tuple[Votes, torch.Tensor, torch.Tensor]] = []   # votes, k, the decision

    def select_all(self, layers, step):
        votes = collect_votes(layers, [self.score(layer) for layer in layers],
                              [self.protected(layer) for layer in layers])
        k = self._budget.tokens(step.seen)
        kept = decide_from_votes(votes, k, self.config.pool)
        self.updates.append((votes, k, kept))
        return kept_in_layers(kept, layers)


def agreement(updates: list[tuple[Votes, torch.Tensor, torch.Tensor]], voters: list[int], pool: int) -> float:
    """Mean over updates of the share of the all-layer decision's free choices the `voters` repeat."""
    shares = []
    for votes, k, reference in updates:   # the all-layer decision, as recorded
        fixed = (votes.guard > 0) | (votes.sink > 0)
        chosen = reference & ~fixed
        if not chosen.any():
            continue
        subset = decide_from_votes(votes, k, pool, voters=voters)
        shares.append(float((subset & chosen).sum()) / float(chosen.sum()))
    return sum(shares) / max(len(shares), 1)


def greedy_layers(updates_by_budget: dict[str, list], num_layers: int, count: int, pool: int) -> list[tuple[list[int], dict]]:
    """Forward selection: [(layers chosen so far, agreement per budget)] for 1..count layers."""
    chosen: list[int] = []
    path = []
    for _ in range(count):
        best = None
        for layer in range(num_layers):
            if layer in chosen:
                continue
            trial = sorted(chosen + [layer])
            per_budget = {b: agreement(u, trial, pool) for b, u in updates_by_budget.items()}
            mean = sum(per_budget.values()) / len(per_budget)
            if best is None or mean > best[0]:
                best = (mean, trial, per_budget)
        chosen = best[1]
        path.append((chosen, best[2]))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namm", default="namms/smollm2", help="a model-wide NAMM directory")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa",
                   help="tasks of the prompts (default: the NAMM's training tasks)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per task")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0: evolution's training prompts)")
    p.add_argument("--budgets", default="0.5,0.25")
    p.add_argument("--max-layers", type=int, default=10, help="greedy selection up to this many layers")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the device's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "score_layers.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    namm = NAMM.from_pretrained(args.namm if Path(args.namm).is_absolute() or Path(args.namm).exists()
                                else ROOT / args.namm)
    if namm.config.scope != "global":
        p.error(f"{args.namm} is a per-head NAMM: only a model-wide NAMM (scope 'global') scores from a subset of layers")
    model, tok = load_model(args.model, dtype=args.dtype)
    settings = namm.memory_settings()
    ev = Evaluator(model, tok, update_every=settings.get("update_every", 256), chunk_size=settings.get("chunk_size", 256))
    samples = load_tasks(args.tasks.split(","), tok, args.prompts, args.length, args.seed)
    budgets = args.budgets.split(",")
    updates: dict[str, list] = {}
    for b in budgets:
        recorder = VoteRecorder(namm.with_budget(b))
        for sample in tqdm(samples, desc=f"votes @{b}"):
            ev.run_loglik(sample, recorder)
        updates[b] = recorder.updates
    num_layers = model.config.num_hidden_layers
    pool = namm.config.pool
    path = greedy_layers(updates, num_layers, min(args.max_layers, num_layers), pool)
    rows, curves = [], {"greedy": [], "evenly spaced": []}
    for count, (layers, per_budget) in enumerate(path, start=1):
        even = scored_layer_indices(count, num_layers)
        even_agreement = {b: agreement(updates[b], even, pool) for b in budgets}
        curves["greedy"].append(sum(per_budget.values()) / len(budgets))
        curves["evenly spaced"].append(sum(even_agreement.values()) / len(budgets))
        rows.append([count, ",".join(map(str, layers)), *(f"{per_budget[b]:.3f}" for b in budgets),
                     ",".join(map(str, even)), *(f"{even_agreement[b]:.3f}" for b in budgets)])
    header = ["layers", "greedy choice", *(f"agreement @{b}" for b in budgets),
              "evenly spaced (layers=K)", *(f"agreement @{b}" for b in budgets)]
    n_updates = ", ".join(f"{len(updates[b])} @{b}" for b in budgets)
    shown = Path(args.namm).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    text = (f"NAMM `{shown}` on {args.model}, {args.length} tokens, {args.prompts} prompts per task "
            f"({args.tasks}), seed {args.seed}; {n_updates} updates. Agreement: the share of the tokens the "
            "all-layer NAMM keeps by choice (sinks and protected tokens left out) that a NAMM scoring from "
            "the listed layers keeps too, on the all-layer run's cache; 1.000 is the same decision.\n\n"
            + markdown_table(header, rows) + "\n")
    out = Path(args.out)
    write_result(out, text)
    plot_agreement(curves, out.with_suffix(".png"), args)


def plot_agreement(curves: dict[str, list[float]], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("layers scored")
    ax.set_ylabel("agreement with every layer")
    ax.set_title(f"{Path(args.namm).name} on {args.model}, {args.length} tokens (mean over budgets)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
