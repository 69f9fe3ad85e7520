"""The fidelity task: plain long text, scored by how closely the memory follows the full cache.

Works for any model, trained or random: next-token agreement with the full cache is the score;
the KL divergence of the predictions and the perplexity under eviction are reported alongside.
"""
from __future__ import annotations

import random
from pathlib import Path

from .base import Sample

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"


def fidelity_samples(tokenizer, n: int, length: int, seed: int) -> list[Sample]:
    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()]
    samples, counts = [], {}
    for i in range(n):
        rng = random.Random(f"fidelity-{seed}-{i}")
        # count each paragraph once (linear in the length, not quadratic), then cut the joined text
        parts, tokens = [], 0
        while tokens < length:
            parts.append(rng.choice(paragraphs) + "\n\n")
            tokens += counts.setdefault(parts[-1], len(tokenizer(parts[-1], add_special_tokens=False).input_ids))
        ids = tokenizer("".join(parts), add_special_tokens=False).input_ids[:length]
        samples.append(Sample(task="fidelity", sample_id=f"fidelity-{length}-{seed}-{i}",
                              context=tokenizer.decode(ids), input="", answers=[""], metric="fidelity",
                              max_new_tokens=0, meta={"target_tokens": length}))
    return samples
