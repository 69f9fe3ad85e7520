"""The headroom at a budget: what a memory that knew the question would keep.

For each prompt the full cache is run once over prompt + reference answer, and every token gets
its hindsight importance (namm_core.distill: the largest attention any layer and head of the
question's and answer's queries paid it, summed over those queries). Then, on the same prompts:

- `hindsight-oracle:B`: keeps the B most important tokens at every update, one set for the
  whole model (the target of the NAMM's warm start);
- `hindsight-oracle-per-head:B`: the same importance, but each layer and KV head keeps its own
  B most important tokens by its own attention (its own column of the question's attention);
- StreamingLLM at B and the full cache.

The oracles read the future: they are upper bounds, not memories. Writes
bench/results/hindsight_oracle.md (means with bootstrap 95% intervals).

    .venv/bin/python bench/hindsight_oracle.py --prompts 12
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import write_result  # noqa: E402
from namm_core import FullCache, MemoryManagedLM, load_model, parse_policy  # noqa: E402
from namm_core.distill import HindsightOracle, HindsightProbe, question_start  # noqa: E402
from namm_core.policies import Budget, keep_top  # noqa: E402
from namm_eval import report  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402


class PerHeadProbe(HindsightProbe):
    """Also keeps, per layer and KV head, the attention the later queries paid each position."""

    def __init__(self, start: int, length: int):
        super().__init__(start, length)
        self.per_head: dict[int, torch.Tensor] = {}   # layer -> [KV heads, length]

    def observe(self, layer_idx, layer, attn, step):
        super().observe(layer_idx, layer, attn, step)
        q = step.query_positions[0] >= self.start
        if q.any():
            per = self.per_head.setdefault(layer_idx, torch.zeros(attn.shape[1], self.length))
            per[:, layer.positions[0, 0]] += attn[0][:, q, :].float().sum(1).cpu()


class PerHeadOracle(HindsightOracle):
    name = "hindsight-oracle-per-head"

    def __init__(self, per_head, budget, sinks=4):
        super().__init__(None, budget, sinks)
        self.per_head = per_head

    def select_all(self, layers, step):
        keeps = []
        for i, layer in enumerate(layers):
            scores = self.per_head[i].unsqueeze(0).gather(-1, layer.positions.clamp(0, self.per_head[i].shape[1] - 1))
            keeps.append(keep_top(scores.masked_fill(self.protected(layer), float("inf")), layer.valid,
                                  self.budget.tokens(step.seen)))
        return keeps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--prompts", type=int, default=12, help="prompts per task")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--budgets", default="0.5,0.25")
    p.add_argument("--seed", type=int, default=7, help="prompt seed (the board's held-out prompts)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the device's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "hindsight_oracle.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    ev = Evaluator(model, tok, update_every=256, chunk_size=256)
    samples = load_tasks(args.tasks.split(","), tok, args.prompts, args.length, args.seed)
    budgets = [str(Budget.parse(b)) for b in args.budgets.split(",")]
    rows = []
    for sample in tqdm(samples, desc="prompts"):
        ids, _ = ev.encode(sample)
        reply = ev.reply_ids(sample, "reference")
        probe = PerHeadProbe(question_start(tok, ids, sample.input), ids.shape[1] + reply.shape[1])
        MemoryManagedLM(model, probe, update_every=10**9, chunk_size=256).continuation_logprobs(ids, reply)
        importance = probe.importance()
        policies = [FullCache()]
        for b in budgets:
            policies += [HindsightOracle(importance, b), PerHeadOracle(probe.per_head, b),
                         parse_policy(f"streamingllm:{b}")]
        for policy in policies:
            rows.append(ev.run_sample(sample, policy).to_row())
    text = (f"{args.model}, {args.length} tokens, {args.prompts} prompts per task ({args.tasks}), seed {args.seed}; "
            "updates every 256 tokens.\n\n" + report.format_table(rows, markdown=True) + "\n")
    write_result(Path(args.out), text)


if __name__ == "__main__":
    main()
