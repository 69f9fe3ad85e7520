"""Token features a NAMM reads: attention spectrogram, EMA reduction, recency.

Every cached token receives a column of attention from the queries that came after it.
The NAMM treats that column as a time series, takes its short-time Fourier transform
(n_fft 32, hop 16, periodic Hann, magnitudes: 17 frequency bins per frame), and folds
the frames into one 17-dim vector per token with an exponential moving average
(0.99 per token, i.e. 0.99**16 per frame). A sinusoidal embedding of the token's age
is prepended: 8 + 17 = 25 features per token.

The computation is *streaming*: each frame needs only the 32 most recent query rows,
so the memory keeps a 16-row carry per layer instead of all queries since the last
update. Because the EMA is linear, folding frames one hop at a time gives exactly the
batch formula of the paper (old EMA x 0.99**512 + discounted sum of the new frames),
with the frames that ended before a token arrived contributing nothing.
"""
from __future__ import annotations


from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpectrogramConfig:
    n_fft: int = 32
    hop: int = 16
    ema_coeff: float = 0.99  # per token; a frame decays by ema_coeff ** hop
    recency_dim: int = 8
    recency_max_freq: float = 50_000.0

    @property
    def n_freq(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def carry(self) -> int:
        """Rows of the previous window prepended to each new one."""
        return self.n_fft - self.hop

    @property
    def feature_dim(self) -> int:
        return self.recency_dim + self.n_freq

    @property
    def frame_decay(self) -> float:
        return self.ema_coeff ** self.hop


def hann_window(n_fft: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, device=device, dtype=dtype)


def frame_magnitudes(rows: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """STFT magnitudes of attention columns.

    rows: [..., T, S] attention rows (T = carry + k*hop query rows, S keys).
    Returns [..., k, S, n_freq]: one spectrum per frame and key.
    """
    *lead, T, S = rows.shape
    n_frames = (T - cfg.n_fft) // cfg.hop + 1
    # [..., S, T] -> windows [..., S, n_frames, n_fft]
    cols = rows.transpose(-1, -2)
    windows = cols.unfold(-1, cfg.n_fft, cfg.hop)
    window = hann_window(cfg.n_fft, device=rows.device, dtype=rows.dtype)
    spec = torch.fft.rfft(windows * window, n=cfg.n_fft, dim=-1).abs()
    assert spec.shape[-2] == n_frames
    return spec.transpose(-2, -3)  # [..., n_frames, S, n_freq]


def fold_frames(
    ema: torch.Tensor,
    frames: torch.Tensor,
    first_frame_of_key: torch.Tensor,
    cfg: SpectrogramConfig,
) -> torch.Tensor:
    """EMA-fold frames into the running per-key state.

    ema: [..., S, n_freq] state (zero for keys with no frame yet).
    frames: [..., k, S, n_freq] new frames, oldest first.
    first_frame_of_key: [..., S] integer: index (into the k new frames) of the first frame
        that may include each key, i.e. the frame whose hop-block contains the key's arrival.
        Frames before it are masked out. Old keys have 0 (or less).
    """
    g = cfg.frame_decay
    k = frames.shape[-3]
    idx = torch.arange(k, device=frames.device)
    # weight of frame f after folding all k: (1-g) * g**(k-1-f)
    weights = (1.0 - g) * torch.pow(torch.tensor(g, dtype=frames.dtype, device=frames.device),
                                    (k - 1 - idx).to(frames.dtype))
    allowed = idx.view(*([1] * (first_frame_of_key.dim() - 1)), k, 1) >= first_frame_of_key.unsqueeze(-2)
    w = weights.view(k, 1) * allowed.to(frames.dtype)  # [..., k, S]
    return ema * (g ** k) + (w.unsqueeze(-1) * frames).sum(dim=-3)


def recency_embedding(age: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """Sinusoidal embedding of a token's age (newest position - its position).

    age: [...] integer or float tensor. Returns [..., recency_dim] as
    [sin(a w_0), cos(a w_0), sin(a w_1), cos(a w_1), ...] with w_i = max_freq**(-2i/d).
    """
    half = cfg.recency_dim // 2
    i = torch.arange(half, device=age.device, dtype=torch.float32)
    freqs = cfg.recency_max_freq ** (-2.0 * i / cfg.recency_dim)
    angles = age.to(torch.float32).unsqueeze(-1) * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class RunningMoments:
    """Mean and variance per feature, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int):
        self.count = 0.0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        n = x.shape[0]
        if n == 0:
            return
        b_mean = x.mean(0)
        b_m2 = ((x - b_mean) ** 2).sum(0)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + b_m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return self.m2 / self.count


def reference_ema_features(attn: torch.Tensor, arrival: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """Plain, non-streaming computation of the EMA spectrogram features, for tests.

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


__all__ = [
    "SpectrogramConfig", "frame_magnitudes", "fold_frames", "recency_embedding",
    "RunningMoments", "reference_ema_features", "hann_window",
]
