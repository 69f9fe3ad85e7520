"""Where the time of one memory-managed generation goes, part by part.

    .venv/bin/python bench/profile_generation.py --tokens 4096 --policies full namm-zero
    git worktree add /tmp/namm-d702c32 d702c32      # the code before the speed work, then:
    PYTHONPATH=/tmp/namm-d702c32 .venv/bin/python bench/profile_generation.py --label d702c32 --append

Times the attention function (without the policy's observe), the policy's observe (NAMM:
the spectrogram fold), the scorer (NAMM: BAM), cache appends and compactions around one
generation (prefill + 32 decoded tokens) of the embedded SmolLM2, after a warm-up. The parts
are found by wrapping the functions that do them, so the same script profiles older commits
of the project (put their checkout first on PYTHONPATH). Writes bench/results/profile.md.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))   # last, so an older checkout on PYTHONPATH takes precedence

from transformers import AttentionInterface  # noqa: E402

from bench.memory_bench import make_ids  # noqa: E402
from bench.tables import markdown_table, write_result  # noqa: E402
from namm_core import NAMM, MemoryManagedLM, attention, cache, load_model, parse_policy, scorers  # noqa: E402  # noqa: E402
from namm_core import namm as namm_module  # noqa: E402

PARTS = ("attention", "observe", "scorer", "append", "compact")


def instrument(seconds: collections.Counter) -> None:
    """Wrap the functions behind each part; observe time is taken out of the attention's."""
    def timed(owner, name, part, exclude=None):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            before = seconds[exclude] if exclude else 0.0
            t = time.perf_counter()
            result = inner(*args, **kwargs)
            seconds[part] += time.perf_counter() - t - ((seconds[exclude] - before) if exclude else 0.0)
            return result
        setattr(owner, name, wrapper)

    timed(namm_module, "fold_rows", "observe")
    timed(scorers.BAMScorer, "forward", "scorer")
    timed(cache.MemoryLayer, "append", "append")
    timed(cache.MemoryLayer, "compact", "compact")
    timed(attention, "namm_attention_forward", "attention", exclude="observe")
    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, attention.namm_attention_forward)
    attention.register = lambda: attention.ATTN_IMPLEMENTATION   # keep the wrapped function registered


def build(spec: str):
    if spec == "namm-zero":
        return NAMM()
    if spec == "namm":
        return NAMM.from_pretrained(ROOT / "namms" / "smollm2")
    return parse_policy(spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--policies", nargs="+", default=["full", "namm-zero", "namm"],
                   help="policy specs; namm-zero is a zero NAMM, namm the shipped one")
    p.add_argument("--label", default="", help="a name for this version of the code, for the table")
    p.add_argument("--update-every", type=int, default=256, help="every policy's update interval (as memory_bench.py)")
    p.add_argument("--chunk-size", type=int, default=256, help="every policy's prefill chunk (as memory_bench.py)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.md")
    p.add_argument("--append", action="store_true", help="add the rows to an existing table in --out")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's weights (default float32, as profile.md and profile_rows.md; memory_bench "
                        "runs bfloat16 where the CPU has bf16 instructions)")
    args = p.parse_args(argv)
    seconds = collections.Counter()
    instrument(seconds)
    import namm_core
    code = args.label or str(Path(namm_core.__file__).parent.parent)
    # rows appended to a table made with other settings must say which they ran with
    code += f" (every {args.update_every}/{args.chunk_size})"
    print(f"profiling the code in {Path(namm_core.__file__).parent}")
    model, tok = load_model("smollm2", dtype=args.dtype)
    MemoryManagedLM(model, NAMM()).generate(make_ids(tok, 600), max_new_tokens=2)  # warm-up
    rows = []
    for n in args.tokens:
        ids = make_ids(tok, n)
        for spec in args.policies:
            lm = MemoryManagedLM(model, build(spec), update_every=args.update_every, chunk_size=args.chunk_size)
            seconds.clear()
            t = time.perf_counter()
            lm.generate(ids, max_new_tokens=32)
            wall = time.perf_counter() - t
            rows.append((code, n, spec, f"{wall:.1f}", *(f"{seconds[k]:.2f}" for k in PARTS),
                         f"{wall - sum(seconds[k] for k in PARTS):.2f}"))
    header = ("code", "tokens", "policy", "seconds", *PARTS, "rest (layers, lm head)")
    table = markdown_table(header, rows)
    if args.append and args.out.is_file():
        text = args.out.read_text() + "\n".join(table.splitlines()[2:]) + "\n"
    else:
        text = (f"SmolLM2 ({args.dtype}) on CPU, prefill + 32 decoded tokens, an update and a chunk every "
                f"{args.update_every} / {args.chunk_size} tokens, one run each; seconds per part.\n\n"
                + table + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
