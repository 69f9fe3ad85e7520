"""Turning prompt text into model input: chat template when the model has one."""
from __future__ import annotations

import torch


def encode_prompt(tokenizer, text: str, chat: bool = True) -> torch.Tensor:
    """[1, T] input ids for one prompt."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not torch.is_tensor(ids):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return ids
    return tokenizer(text, return_tensors="pt").input_ids
