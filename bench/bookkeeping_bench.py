"""The memory's bookkeeping operations against the plain torch call each one replaces, on the
shapes of a 16k-token SmolLM2 generation at a quarter of the cache (3 KV heads of 3 query heads,
~4.3k cached slots, blocks of ~24 query rows), one thread:

    .venv/bin/python bench/bookkeeping_bench.py      # ~30 s; writes bench/results/bookkeeping.md

- the query-group mean of a block of attention rows: `attention.mean_over_group` against
  `torch.mean(probs.to(out.dtype), dim=2, out=...)` (the same values, checked here too);
- compaction with one kept set for every head: `index_select` against `gather` with an expanded
  index, for keys/values (bf16, head dim 64) and the NAMM's spectrogram state (float32, 17 bins).

Each time is the median of `--repeats` timed batches of `--calls` calls, both ways interleaved.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core.attention import mean_over_group  # noqa: E402


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(plain, fast, calls: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of each, the two interleaved so drifts of the machine hit both."""
    for fn in (plain, fast):
        timed(fn, 3)
    plain_t, fast_t = [], []
    for _ in range(repeats):
        plain_t.append(timed(plain, calls))
        fast_t.append(timed(fast, calls))
    return statistics.median(plain_t), statistics.median(fast_t)


def group_mean_cases(slots: int, rows: int):
    for probs_dtype, out_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        probs = torch.softmax(torch.randn(1, 3, 3, rows, slots), dim=-1).to(probs_dtype)
        out = torch.empty(1, 3, 256, slots, dtype=out_dtype)[:, :, :rows]
        reference = torch.mean(probs.to(out_dtype), dim=2)
        mean_over_group(probs, out)
        assert torch.equal(out, reference), "mean_over_group differs from torch.mean"
        name = f"query-group mean, rows {probs_dtype} -> {out_dtype}, [1, 3, 3, {rows}, {slots}]"
        yield (name, "torch.mean", "mean_over_group",
               lambda p=probs, o=out: torch.mean(p.to(o.dtype), dim=2, out=o),
               lambda p=probs, o=out: mean_over_group(p, o))


def compaction_cases(slots: int, kept: int):
    keep = torch.zeros(slots, dtype=torch.bool)
    keep[torch.randperm(slots, generator=torch.Generator().manual_seed(0))[:kept]] = True
    order = torch.argsort((~keep).to(torch.int8), stable=True)[:kept].expand(1, 3, kept)
    for what, shape, dtype in (("keys or values", (1, 3, slots, 64), torch.bfloat16),
                               ("spectrogram state", (1, 3, slots, 17), torch.float32)):
        t = torch.randn(shape).to(dtype)
        index = order.view(1, 3, kept, 1).expand(1, 3, kept, shape[-1])
        assert torch.equal(t.gather(2, index), t.index_select(2, order[0, 0]))
        yield (f"compaction of {what}, {dtype} {list(shape)} -> {kept} slots", "gather", "index_select",
               lambda t=t, i=index: t.gather(2, i), lambda t=t, o=order[0, 0]: t.index_select(2, o))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=4352, help="cached slots (16k tokens at a quarter + a chunk)")
    p.add_argument("--rows", type=int, default=24, help="query rows per eager-attention block")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bookkeeping.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    cases = [*group_mean_cases(args.slots, args.rows), *compaction_cases(args.slots, args.slots - 256)]
    for name, plain_name, fast_name, plain, fast in cases:
        plain_s, fast_s = compare(plain, fast, args.calls, args.repeats)
        rows.append((name, plain_name, f"{plain_s * 1e6:.0f}", fast_name, f"{fast_s * 1e6:.0f}",
                     f"{plain_s / fast_s:.2f}"))
    header = ("operation", "plain", "µs per call", "used", "µs per call", "plain / used")
    text = (f"One CPU thread; each time the median of {args.repeats} interleaved batches of {args.calls} calls; "
            "both ways checked to give the same tensors.\n\n" + markdown_table(header, rows) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
