"""Building the model a worker serves: a named/pathed model, or a tiny random one for smoke runs."""
from __future__ import annotations

from typing import Optional


def build_model(name: str = "smollm2", dtype: str = "auto", device: str = "auto",
                rope_scaling: Optional[dict] = None, max_position_embeddings: Optional[int] = None,
                tiny_random: Optional[dict] = None):
    """(model, tokenizer). `tiny_random` = {architecture, seed, tokenizer, **config kwargs} builds a
    randomly initialised model (milliseconds) that uses a real tokenizer (default: smollm2's)."""
    from namm_core.models import load_model, tiny_random_model

    if not tiny_random:
        return load_model(name, device=device, dtype=dtype, rope_scaling=rope_scaling,
                          max_position_embeddings=max_position_embeddings)
    try:
        return tiny_random_model(device=device, dtype=dtype, **tiny_random)
    except ValueError as e:
        raise ValueError(f"model.tiny_random: {e}") from None
