"""A model's rotary position embedding, as a policy needs it: the cos / sin that rotate a query
to a position, their inverse, and their average over a range of future positions.

transformers rotates a head vector x at position p as x * cos_p + rotate_half(x) * sin_p
(pairs (i, i + D/2) turn by p * inv_freq_i, scaled by the rope type's attention scaling). The
model's own rotary module is called, so every rope type and Gemma 3's per-layer bases are right.
"""
from __future__ import annotations

import inspect

import torch

from .files import text_config


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Rotary:
    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.module = getattr(decoder, "rotary_emb", None)
        if self.module is None:
            raise TypeError(f"{type(model).__name__} has no rotary embedding (rotary_emb) to read positions from")
        text = text_config(model.config)
        self.layer_types = getattr(text, "layer_types", None)
        self.takes_layer_type = "layer_type" in inspect.signature(self.module.forward).parameters

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, N] -> cos, sin [B, N, D] float32 (attention scaling included)."""
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        if self.takes_layer_type:
            cos, sin = self.module(probe, positions.long(), self.layer_types[layer_idx])
        else:
            cos, sin = self.module(probe, positions.long())
        return cos.float(), sin.float()

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """x [B, H, N, D] rotated to positions [B, N] -> the vectors before the rotation."""
        cos, sin = (t.unsqueeze(1) for t in self.cos_sin(positions, layer_idx))
        x = x.float()
        return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)

    def mean_rotation(self, first: torch.Tensor, count: int, layer_idx: int) -> torch.Tensor:
        """[B, D, D] the rotation averaged over positions first[b] .. first[b] + count - 1:
        mean_p (diag(cos_p) + diag(sin_p) P), with P x = rotate_half(x)."""
        positions = first.view(-1, 1) + torch.arange(count, device=first.device)
        cos, sin = self.cos_sin(positions, layer_idx)
        cos, sin = cos.mean(1), sin.mean(1)                                        # [B, D]
        D = cos.shape[-1]
        P = rotate_half(torch.eye(D, device=cos.device)).T                         # P @ x == rotate_half(x)
        return torch.diag_embed(cos) + torch.diag_embed(sin) @ P
