"""How much of a model-wide NAMM's decision survives a window on its BAM's backward attention?

The BAM lets every cached token attend to every newer one: S^2/2 pairs per layer and KV head at
each update, the term that makes a NAMM costlier than the full cache at long inputs
(bench/results/namm_flops.md, memory.md). A window (`namm@B/window=W`, `NAMMConfig.bam_window`)
limits each token to about W of them: the W newest of the cache ("recent") or the W - 1 right
after it ("band"). This study runs the NAMM as shipped (no window) on prompts the NAMM was trained
on (seed 0 by default, never a board's seed), and at every update also scores the same cache with
each windowed variant (teacher-forced on the shipped run's cache) and measures how much of the
shipped decision it repeats: the share of the tokens the shipped NAMM keeps by choice (sinks and
protected tokens left out) that the variant keeps too. Beside it, the seconds each variant's
scoring took over the same updates, relative to the unwindowed BAM's (one run, same caches).

Writes bench/results/bam_window.md. Whether a variant holds on the board is a board's question
(`bench/namm_board.py --namm-variants window=256`).

    .venv/bin/python bench/bam_window.py --lengths 1024,4096 --prompts 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, load_model  # noqa: E402
from namm_core.selection import collect_votes, decide_from_votes, kept_in_layers  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402


def parse_variant(text: str) -> tuple[int, str]:
    """`256` or `256:band` -> (256, "band"); keys default to "recent"."""
    window, _, keys = text.partition(":")
    return int(window), keys or "recent"


class WindowComparison(NAMM):
    """The NAMM deciding as shipped, and at every update also scoring the same cache with each
    windowed variant: the share of its free choices each repeats, and each one's scoring time."""

    def __init__(self, namm: NAMM, variants: list[tuple[int, str]]):
        super().__init__(namm.config)
        self.scorer, self.source = namm.scorer, namm.source
        self.norm_mean, self.norm_var, self.norm_count = namm.norm_mean, namm.norm_var, namm.norm_count
        self.variants = {v: self.with_bam_window(*v) for v in variants}
        self.shares: dict = {v: [] for v in variants}
        self.seconds: dict = {None: 0.0, **{v: 0.0 for v in variants}}
        self.cache_sizes: list[int] = []

    def _timed_scores(self, key, namm, layers):
        t0 = time.perf_counter()
        scores = [namm.score(layer) for layer in layers]
        self.seconds[key] += time.perf_counter() - t0
        return scores

    def select_all(self, layers, step):
        protected = [self.protected(layer) for layer in layers]
        k = self._budget.tokens(step.seen)
        votes = collect_votes(layers, self._timed_scores(None, self, layers), protected)
        kept = decide_from_votes(votes, k, self.config.pool)
        chosen = kept & ~(votes.guard > 0) & ~(votes.sink > 0)
        self.cache_sizes.append(int(layers[0].valid[0, 0].sum()))
        for key, variant in self.variants.items():
            other = collect_votes(layers, self._timed_scores(key, variant, layers), protected)
            theirs = decide_from_votes(other, k, self.config.pool)
            if chosen.any():
                self.shares[key].append(float((theirs & chosen).sum()) / float(chosen.sum()))
        return kept_in_layers(kept, layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namm", default="namms/smollm2", help="a model-wide BAM NAMM directory")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa",
                   help="tasks of the prompts (default: the NAMM's training tasks)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per task and length")
    p.add_argument("--lengths", default="1024,4096", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0: evolution's training prompts)")
    p.add_argument("--budgets", default="0.5,0.25")
    p.add_argument("--variants", default="128,256,512,256:band",
                   help="windows W[:KEYS] (KEYS recent, the default, or band), comma-separated")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the device's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bam_window.md"))
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    except ValueError:
        p.error(f"--variants {args.variants!r}: expected windows like 128,256:band")
    torch.set_num_threads(args.threads)
    namm = NAMM.from_pretrained(args.namm if Path(args.namm).is_absolute() or Path(args.namm).exists()
                                else ROOT / args.namm)
    if namm.config.scorer != "bam" or namm.config.scope != "global":
        p.error(f"{args.namm}: this study needs a model-wide NAMM with the BAM scorer")
    for window, keys in variants:   # bad windows fail before the model loads
        try:
            namm.with_bam_window(window, keys)
        except ValueError as e:
            p.error(f"--variants: {e}")
    model, tok = load_model(args.model, dtype=args.dtype)
    settings = namm.memory_settings()
    ev = Evaluator(model, tok, update_every=settings.get("update_every", 256), chunk_size=settings.get("chunk_size", 256))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        samples = load_tasks(args.tasks.split(","), tok, args.prompts, length, args.seed)
        for b in args.budgets.split(","):
            study = WindowComparison(namm.with_budget(b), variants)
            with torch.no_grad():
                for sample in tqdm(samples, desc=f"{length} tokens @{b}"):
                    ev.run_loglik(sample, study)
            sizes = study.cache_sizes
            for key in variants:
                shares = study.shares[key]
                rows.append([length, b, len(sizes), f"{sum(sizes) / max(len(sizes), 1):.0f}", max(sizes, default=0),
                             f"{key[0]} {key[1]}", f"{sum(shares) / max(len(shares), 1):.3f}",
                             f"{min(shares, default=float('nan')):.3f}",
                             f"{study.seconds[key] / max(study.seconds[None], 1e-9):.2f}"])
    header = ["tokens", "budget", "updates", "mean cache", "largest cache", "window, keys", "agreement",
              "lowest update", "scoring time / no window"]
    shown = Path(args.namm).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    text = (f"NAMM `{shown}` on {args.model}, {args.prompts} prompts per task ({args.tasks}) and length, seed "
            f"{args.seed}. Agreement: over the updates, the mean share of the tokens the NAMM without a window keeps "
            "by choice (sinks and protected tokens left out) that the windowed NAMM keeps too, on the same cache "
            "(1.000: the same decision); lowest update: the smallest share at any one update. Scoring time: every "
            "layer's scores at every update, over the same without a window (measured in the same run). Mean and "
            "largest cache: tokens held per layer and KV head at an update.\n\n" + markdown_table(header, rows) + "\n")
    write_result(Path(args.out), text)


if __name__ == "__main__":
    main()
