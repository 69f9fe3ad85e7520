"""Throughput of candidate evaluation (the evolution hot path), and the spectrogram fold.

    .venv/bin/python bench/eval_speed_bench.py            # ~10 min on one CPU thread

1. Candidate-prompt evaluations per CPU-second: random NAMMs (sigma 0.065, as CMA-ES proposes)
   on 1k-token prompts of the embedded SmolLM2, updates every 256 tokens, under each way the
   evolution can evaluate them: the task score (decoding the reply, from scratch or from the
   prompt's shared pre-update state), the teacher-forced log-likelihood of the reference reply
   (no decoding), with a top-k budget (the cache really shrinks), and in bf16 where the CPU
   has bf16 instructions.
2. Folding one layer's attention rows (512 rows x 4,096 keys, 3 KV heads) into the EMA
   spectrogram: all frames at once (`fold_frames(frame_magnitudes(...))`, the plain reference)
   and `fold_rows` (one frame at a time, in place: what the NAMM runs).
Writes bench/results/eval_speed.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, NAMMConfig, load_model  # noqa: E402
from namm_core.features import SpectrogramConfig, fold_frames, fold_rows, frame_magnitudes  # noqa: E402
from namm_core.models import cpu_has_bf16  # noqa: E402
from namm_eval.evaluator import Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402


def seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


MODES = [
    # (label, fitness kind, dtype, shared prefix, NAMM budget)
    ("task score (decoding), fp32, from scratch", "task_score", "float32", 0, None),
    ("task score (decoding), fp32, shared prefix", "task_score", "float32", 1, None),
    ("log-likelihood, fp32, shared prefix", "loglik", "float32", 1, None),
    ("log-likelihood, fp32, shared prefix, top-k 0.5", "loglik", "float32", 1, "0.5"),
    ("log-likelihood, bf16, shared prefix, top-k 0.5", "loglik", "bfloat16", 1, "0.5"),
]


def candidate_rate(model, tok, samples, kind, share, budget, n_candidates) -> tuple[float, float]:
    """(candidate-prompt evaluations per CPU-second, CPU seconds per evaluation) for one mode."""
    rng = np.random.default_rng(0)
    config = NAMMConfig(selection="top_k", budget=budget) if budget else NAMMConfig()
    candidates = [NAMM(config).set_params(torch.tensor(rng.normal(0, 0.065, 4172), dtype=torch.float32))
                  for _ in range(n_candidates)]
    ev = Evaluator(model, tok, update_every=256, chunk_size=256, fidelity_kl=False, share_prefixes=len(samples) * share)
    for sample in samples:
        ev.encode(sample)
        if kind == "loglik":
            ev.reply_ids(sample)
    cpu = time.process_time()
    for c in candidates:
        for sample in samples:
            ev.run_loglik(sample, c) if kind == "loglik" else ev.run_sample(sample, c)
    spent = time.process_time() - cpu
    evaluations = len(candidates) * len(samples)
    return evaluations / spent, spent / evaluations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--prompts-per-task", type=int, default=2)
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_speed.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    bf16 = cpu_has_bf16()
    speed_rows, base = [], None
    models = {}
    for label, kind, dtype, share, budget in MODES:
        if dtype == "bfloat16" and not bf16:
            speed_rows.append((label, "skipped: this CPU has no bf16 instructions", "", ""))
            continue
        if dtype not in models:
            models[dtype] = load_model("smollm2", device="cpu", dtype=dtype)
        model, tok = models[dtype]
        samples = load_tasks(args.tasks.split(","), tok, num_prompts=args.prompts_per_task, context_length=1024,
                             seed=0)
        rate, per_eval = candidate_rate(model, tok, samples, kind, share, budget, args.candidates)
        base = base or rate
        speed_rows.append((label, f"{per_eval:.2f}", f"{rate:.3f}", f"{rate / base:.2f}"))
        print(speed_rows[-1], flush=True)
    rows = []
    cfg, g = SpectrogramConfig(), torch.Generator().manual_seed(0)
    attn = torch.rand(1, 3, 512, 4096, generator=g)
    prefix = torch.rand(1, 3, cfg.carry, 4096, generator=g)
    ema = torch.zeros(1, 3, 4096, cfg.n_freq)
    # old keys, then the chunk's own 512 keys arriving one per row (as in a prefill chunk)
    first = torch.cat([torch.full((3584,), -5), torch.arange(512) // cfg.hop]).view(1, 1, 4096).expand(1, 3, 4096)
    all_at_once = seconds(lambda: fold_frames(ema, frame_magnitudes(prefix, attn, cfg), first, cfg), 5)
    frame_by_frame = seconds(lambda: fold_rows(ema, prefix, attn, first, cfg), 5)
    rows.append(("spectrogram fold, one layer, 512 x 4,096", "all frames at once", statistics.median(all_at_once)))
    rows.append(("spectrogram fold, one layer, 512 x 4,096", "fold_rows", statistics.median(frame_by_frame)))

    table = []
    for i, (work, how, s) in enumerate(rows):
        base = rows[i - i % 2][2]
        table.append((work, how, f"{s:.3f}", f"{s / base:.2f}"))
    n_prompts = len(args.tasks.split(",")) * args.prompts_per_task
    text = (f"Candidate evaluations: SmolLM2 on CPU ({'with' if bf16 else 'without'} bf16 instructions), one "
            f"thread, one run: {args.candidates} random NAMMs (sigma 0.065, as CMA-ES proposes) x {n_prompts} "
            f"prompts of 1k tokens ({args.tasks}), updates every 256 tokens; CPU seconds by process_time "
            "(shared-prefix rows include building each prefix once).\n\n"
            + markdown_table(("mode", "CPU s per evaluation", "evaluations per CPU-second", "x first row"),
                             speed_rows)
            + "\n\nSpectrogram fold, median of 5:\n\n"
            + markdown_table(("work", "how", "seconds", "/ first"), table) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
