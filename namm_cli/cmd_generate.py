"""`namm generate`: answer prompts under memory policies and show what the memory kept."""
from __future__ import annotations

import argparse
from pathlib import Path

from .cmd_eval import ROW_CAPTURE_CHOICES

HELP = "generate from prompts under one or more memory policies, with memory statistics"
EPILOG = """examples:
  namm generate --prompt-file doc.txt --policy full --policy namm --policy snapkv:0.25
  namm generate --prompt-file doc.txt --policy namm@0.25 --do-sample --temperature 0.7 --top-p 0.9 --seed 0 --stream
  namm generate --prompts-file prompts.jsonl --policy h2o:0.5      # one {"prompt": ...} per line, one batch

Decoding follows transformers' GenerationConfig (greedy unless --do-sample). A NAMM runs with the
update interval and chunk size it was evolved with unless --update-every / --chunk-size say
otherwise (then a warning says so).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="a text file holding one prompt")
    src.add_argument("--prompts-file", type=Path,
                     help="a .jsonl file, one prompt per line ({\"prompt\": ...} or a JSON string); run as one "
                          "left-padded batch")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded, default), 'gemma3-270m', 'tiny-random', a hub id or a local path")
    from namm_core.registry import policy_help

    p.add_argument("--policy", action="append", default=None,
                   help=f"memory policy, repeatable (default: full): {policy_help()}")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (transformers default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely (transformers default 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.2; 1.0 = none")
    p.add_argument("--stop", action="append", default=None, help="stop when the reply ends with this text; repeatable")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible replies)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are made (one prompt at a time)")
    p.add_argument("--update-every", type=int, default=None, help="run the memory every N tokens")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk size")
    p.add_argument("--row-capture", choices=ROW_CAPTURE_CHOICES, default="inline",
                   help="how the attention rows a NAMM (or another policy reading attention) gets are taken: "
                        "inline (an eager attention hands its probabilities over; the faster on CPU) or separate "
                        "(every output from torch's fused kernel, the rows computed apart; meant for GPUs, "
                        "unmeasured there)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompts raw")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from transformers import GenerationConfig, TextStreamer

    from namm_core import MemoryManagedLM, load_model, parse_policy
    from namm_core.sampling import make_generation_config
    from namm_eval.prompts import encode_prompt

    # everything a user typed is checked before the model loads
    policies = [parse_policy(s) for s in (args.policy or ["full"])]
    texts = _prompts(args)
    sampling = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p") if getattr(args, n) is not None]
    if sampling and not args.do_sample:
        raise ValueError(f"{', '.join(sampling)} only apply when sampling: add --do-sample (greedy decoding otherwise)")
    if args.seed is not None and not args.do_sample:
        raise ValueError("--seed seeds the sampling: add --do-sample (greedy decoding needs no seed)")
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop is empty: give the text that ends a reply, e.g. --stop '\n\n'")
    config = make_generation_config(GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                                     stop_strings=args.stop or None),
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    repetition_penalty=args.repetition_penalty)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, t, chat=not args.no_chat_template)[0] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):   # left padding: every prompt ends in the last column
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    print(f"{len(texts)} prompt(s) of {min(map(len, encoded))}-{width} tokens, model {args.model}")
    rows, answers = [], []
    for policy in policies:
        lm = MemoryManagedLM(model, policy, update_every=args.update_every, chunk_size=args.chunk_size,
                             tokenizer=tokenizer, row_capture=args.row_capture)
        if args.stream:   # one prompt at a time: a streamer takes one sequence
            outs = []
            for i in range(len(texts)):
                print(f"[{policy.describe()}, prompt {i + 1}] ", end="", flush=True)
                outs.append(lm.generate(ids[i:i + 1, width - len(encoded[i]):], generation_config=config,
                                        seed=args.seed, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                             skip_special_tokens=True)))
            results = [(o.sequences[0], o.stats.sequence_retention(0), o.stats) for o in outs]
        else:
            out = lm.generate(ids, attention_mask=mask, generation_config=config, seed=args.seed)
            results = [(out.sequences[i], out.stats.sequence_retention(i), out.stats if i == 0 else None)
                       for i in range(len(texts))]
        for i, (sequence, retention, stats) in enumerate(results):
            answer = tokenizer.decode(sequence, skip_special_tokens=True).strip()
            # a batch shares one cache and one clock: its peak KV and seconds are given once
            cost = ("", "") if stats is None else (f"{stats.peak_kv_bytes / 2**20:.1f}", f"{stats.seconds:.2f}")
            rows.append((policy.describe(), f"prompt {i + 1}", f"{retention:.3f}", *cost))
            answers.append((policy.describe(), i + 1, answer))
    batch = len(texts) > 1 and not args.stream
    _print_table(("policy", "prompt", "retention", "peak KV MiB" + " (batch)" * batch, "seconds" + " (batch)" * batch),
                 rows)
    if not args.stream:   # streamed replies were printed whole already
        print()
        for name, i, answer in answers:
            print(f"[{name}, prompt {i}] {answer}")
    return 0


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return [args.prompt]
    if args.prompt_file is not None:
        return [_read_text(args.prompt_file)]
    from namm_eval.tasks.files import read_jsonl

    path = args.prompts_file
    texts = []
    for line_no, item in read_jsonl(path, _read_text(path)):
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line_no}: expected {{\"prompt\": \"...\"}} or a JSON string with text")
        texts.append(text)
    if not texts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return texts


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} is not UTF-8 text") from None
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
