"""`namm generate`: answer one prompt under a memory policy and show what the memory kept."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate from one prompt under one or more memory policies, with memory statistics"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="a text file holding the prompt")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), 'gemma3-270m', a hub id or a local path")
    p.add_argument("--policy", action="append", default=None,
                   help="memory policy, repeatable: full | streamingllm:B | h2o:B | l2:B | snapkv:B | tova:B | namm[:DIR]")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--update-every", type=int, default=512, help="run the memory every N tokens")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt raw")
    p.set_defaults(run=run)


def run(args) -> int:
    from namm_core import MemoryManagedLM, load_model, parse_policy
    from workers.prompts import encode_prompt

    policies = [parse_policy(s) for s in (args.policy or ["full"])]  # validate before loading the model
    text = args.prompt if args.prompt is not None else _read(args.prompt_file)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = encode_prompt(tokenizer, text, chat=not args.no_chat_template)
    print(f"prompt: {ids.shape[1]} tokens, model {args.model}")
    rows = []
    for policy in policies:
        lm = MemoryManagedLM(model, policy, update_every=args.update_every, chunk_size=args.chunk_size,
                             tokenizer=tokenizer)
        out = lm.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
        s = out.stats
        rows.append((policy.describe(), f"{s.mean_retention:.3f}", f"{s.peak_kv_bytes / 2**20:.1f}",
                     f"{s.seconds:.2f}", answer.replace("\n", " ")[:60]))
    _print_table(("policy", "retention", "peak KV MiB", "seconds", "answer"), rows)
    return 0


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty")
    return text


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
