"""What the evolution hot path saves: shared prefixes and frame-by-frame spectrogram folding.

    .venv/bin/python bench/eval_speed_bench.py            # ~1 min on one CPU thread

1. One candidate evaluation (a random NAMM, sigma 0.065, as CMA-ES proposes) on a 1k-token
   passkey prompt of the embedded SmolLM2 with updates every 256 tokens: from scratch, and from
   the prompt's shared pre-update state (the first candidate builds it, the rest reuse it).
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
from namm_core import NAMM, load_model  # noqa: E402
from namm_core.features import SpectrogramConfig, fold_frames, fold_rows, frame_magnitudes  # noqa: E402
from workers.evaluator import Evaluator  # noqa: E402
from workers.tasks import load_tasks  # noqa: E402


def seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_speed.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    sample = load_tasks(["passkey"], tok, num_prompts=1, context_length=1024, seed=0)[0]
    rng = np.random.default_rng(0)
    candidates = [NAMM().set_params(torch.tensor(rng.normal(0, 0.065, 4172), dtype=torch.float32))
                  for _ in range(args.candidates)]
    rows = []
    for share in (0, 1):
        ev = Evaluator(model, tok, update_every=256, chunk_size=256, fidelity_kl=False, share_prefixes=share)
        ev.encode(sample)
        times = [seconds(lambda: ev.run_sample(sample, c), 1)[0] for c in candidates]
        rows.append(("candidate evaluation, 1k-token prompt", "shared prefix" if share else "from scratch",
                     statistics.mean(times)))

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
    text = (f"SmolLM2 on CPU, one thread, one run; candidate rows: mean of {args.candidates} random NAMMs "
            "(the shared row includes building the prefix once); fold rows: median of 5.\n\n"
            + markdown_table(("work", "how", "seconds", "/ first"), table) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
