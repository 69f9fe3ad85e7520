"""Plain, slow re-computations the tests compare the library against (not used by the library)."""
import math

import torch

from namm_core.features import SpectrogramConfig, hann_window


def reference_ema_features(attn: torch.Tensor, arrival: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """Plain, non-streaming computation of the EMA spectrogram features.

    attn: [Q, S] attention rows of one head for Q queries (Q a multiple of hop), starting
    from an empty memory; arrival[s] is the query row at which key s arrived.
    Uses torch.stft on the zero-prefixed column, then the paper's discounted sum.
    """
    Q, S = attn.shape
    col = torch.cat([attn.new_zeros(cfg.carry, S), attn], 0).T  # [S, carry+Q]
    spec = torch.stft(col, n_fft=cfg.n_fft, hop_length=cfg.hop, center=False,
                      window=hann_window(cfg.n_fft, dtype=attn.dtype), onesided=True,
                      return_complex=True).abs()  # [S, n_freq, F]
    F = spec.shape[-1]
    g = cfg.frame_decay
    out = torch.zeros(S, cfg.n_freq, dtype=attn.dtype)
    for s in range(S):
        first = int(arrival[s]) // cfg.hop
        for f in range(first, F):
            out[s] += (1 - g) * g ** (F - 1 - f) * spec[s, :, f]
    return out


def bam_reference_forward(scorer, x, positions, valid, window=None, keys="recent"):
    """BAMScorer.forward with a plain dense backward mask (no reordering, no fused kernel).

    With a window, by the tokens' ranks among the valid ones (0: the newest): "recent" lets a
    token see the newer tokens of rank < window; "band" those at most window - 1 ranks newer."""
    q, k, v = scorer.qkv(x).split(scorer.head_dim, dim=-1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(scorer.head_dim)
    mask = (positions.unsqueeze(-1) <= positions.unsqueeze(-2)) & valid.unsqueeze(-2)
    if window is not None:
        newer = (positions.unsqueeze(-1) < positions.unsqueeze(-2)) & valid.unsqueeze(-2)
        rank = newer.sum(-1)   # [N, S] how many valid tokens are newer than each
        if keys == "recent":
            mask = mask & (rank.unsqueeze(-2) < window)
        else:
            mask = mask & (rank.unsqueeze(-1) - rank.unsqueeze(-2) < window)
    mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    attended = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v
    res, mult = scorer.modulation(attended).split(scorer.in_dim, dim=-1)
    return scorer.readout(x * (1.0 + mult) + res).squeeze(-1)
