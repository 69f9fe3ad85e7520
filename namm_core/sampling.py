"""Choosing the next token with Hugging Face's semantics, for the memory's own decode loop.

`MemoryManagedLM.generate` owns its loop (transformers' `model.generate` cannot drive the memory,
see the README), but what a user sets is transformers' `GenerationConfig`: greedy or sampling
(`do_sample`, `temperature`, `top_k`, `top_p`), `repetition_penalty`, `max_new_tokens`, EOS and
padding ids, `stop_strings`. The logits processors and the stop-string criterion are
transformers' own classes, applied in the order `model.generate` applies them; sampling draws
from a seeded generator, so a seed reproduces a sample.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria


def make_generation_config(generation_config: Optional[GenerationConfig] = None, **overrides) -> GenerationConfig:
    """A copy of `generation_config` (default: greedy, 32 new tokens) with the non-None overrides set."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig(max_new_tokens=32)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if config.max_new_tokens is None:
        config.max_new_tokens = 32
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    if config.do_sample:
        if config.temperature is not None and not config.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {config.temperature}")
        if config.top_p is not None and not 0 < config.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.stop_strings is not None:
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        if not stops or not all(isinstance(t, str) and t for t in stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {config.stop_strings!r}")
    if config.top_k is not None and (isinstance(config.top_k, bool) or config.top_k < 0):
        raise ValueError(f"top_k must be >= 0, got {config.top_k}")
    if config.repetition_penalty is not None and not config.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive, got {config.repetition_penalty}")
    return config


class TokenChooser:
    """Next tokens from logits: transformers' processors, then argmax or a seeded draw."""

    def __init__(self, config: GenerationConfig, device, tokenizer=None, seed: Optional[int] = None):
        self.config = config
        self.processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
        if config.do_sample:
            if config.temperature not in (None, 1.0):
                self.processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self.processors.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p not in (None, 1.0):
                self.processors.append(TopPLogitsWarper(top_p=config.top_p))
        self.stop = None
        if config.stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings need the tokenizer: MemoryManagedLM(..., tokenizer=tok)")
            self.stop = StopStringCriteria(tokenizer, config.stop_strings)
        self.generator = None
        if config.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        eos = config.eos_token_id
        self.eos = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or [])), dtype=torch.long,
                                device=device)

    def __call__(self, sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """sequences [B, t] (prompt and tokens so far), logits [B, V] -> next tokens [B]."""
        scores = self.processors(sequences, logits.float())
        if self.generator is None:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def finished(self, sequences: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """[B] True where the new token ends the sequence (EOS, or a stop string completed)."""
        done = torch.isin(token, self.eos) if self.eos.numel() else torch.zeros_like(token, dtype=torch.bool)
        if self.stop is not None:
            done |= self.stop(sequences, None).to(done.device)
        return done
