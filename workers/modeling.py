"""Building the model a worker serves: a named/pathed model, or a tiny random one for smoke runs."""
from __future__ import annotations

from typing import Optional

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")


def build_model(name: str = "smollm2", dtype: str = "auto", device: str = "auto",
                rope_scaling: Optional[dict] = None, max_position_embeddings: Optional[int] = None,
                tiny_random: Optional[dict] = None):
    """(model, tokenizer). `tiny_random` = {architecture, seed, tokenizer, **config kwargs} builds a
    randomly initialised model (milliseconds) that uses a real tokenizer (default: smollm2's)."""
    from namm_core.models import load_model, pick_device, pick_dtype, resolve_model_path

    if not tiny_random:
        return load_model(name, device=device, dtype=dtype, rope_scaling=rope_scaling,
                          max_position_embeddings=max_position_embeddings)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(tiny_random)
    arch = spec.pop("architecture", "llama")
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"model.tiny_random.architecture: expected one of {TINY_ARCHITECTURES}, got {arch!r}")
    seed = int(spec.pop("seed", 0))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.pop("tokenizer", "smollm2")))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    kwargs.update(spec)
    model_type = "gemma3_text" if arch == "gemma3" else arch
    config = AutoConfig.for_model(model_type, **kwargs)
    dev = pick_device(device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dev, dtype)).to(dev).eval()
    return model, tokenizer
