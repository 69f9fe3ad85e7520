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
from functools import lru_cache

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


def dft_basis(n_fft: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n_fft, 2 * n_freq] real matrix: Hann-windowed real DFT (cosine part, then sine part).

    A 32-point transform is far cheaper as one matmul than as torch.fft + complex abs.
    """
    n = torch.arange(n_fft, dtype=torch.float64)
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * torch.pi * n.unsqueeze(1) * f.unsqueeze(0) / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).unsqueeze(1)
    basis = torch.cat([window * torch.cos(angle), -window * torch.sin(angle)], dim=1)
    return basis.to(device=device, dtype=dtype)


def frame_magnitudes(prefix: torch.Tensor, rows: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """STFT magnitudes of attention columns, computed in row layout.

    prefix: [..., carry, S] the last `carry` rows before `rows` (zeros at the start).
    rows:   [..., k * hop, S] new attention rows (queries x keys).
    Returns [..., k, n_freq, S]: frame j spans prefix+rows[j*hop - carry : j*hop + hop].

    A window is n_fft / hop consecutive hop blocks, so the windowed DFT is a sum of small
    matmuls over views of the rows: the (large) attention matrix is never copied or
    transposed, which makes this several times faster than torch.stft on CPU.
    """
    if cfg.n_fft % cfg.hop or prefix.shape[-2] != cfg.carry:
        raise ValueError("frame_magnitudes needs n_fft to be a multiple of hop and a carry-row prefix")
    m = cfg.n_fft // cfg.hop
    k = rows.shape[-2] // cfg.hop
    basis_t = dft_basis(cfg.n_fft, rows.device, rows.dtype).T  # [2F, n_fft]
    blocks = rows.reshape(*rows.shape[:-2], k, cfg.hop, rows.shape[-1])
    pre_blocks = prefix.reshape(*prefix.shape[:-2], m - 1, cfg.hop, prefix.shape[-1])
    # the last block of every window is a new block: start from it, then add earlier blocks
    spec = basis_t[:, (m - 1) * cfg.hop:] @ blocks                  # [..., k, 2F, S]
    for i in range(m - 1):                                          # block i of each window
        w = basis_t[:, i * cfg.hop:(i + 1) * cfg.hop]
        shift = m - 1 - i                                           # blocks before the newest
        if k > shift:
            spec[..., shift:, :, :] += w @ blocks[..., : k - shift, :, :]
        for j in range(min(shift, k)):                              # windows reaching into the prefix
            spec[..., j, :, :] += w @ pre_blocks[..., i + j, :, :]
    re, im = spec.split(cfg.n_freq, dim=-2)
    return torch.sqrt(re * re + im * im)


def fold_frames(
    ema: torch.Tensor,
    frames: torch.Tensor,
    first_frame_of_key: torch.Tensor,
    cfg: SpectrogramConfig,
) -> torch.Tensor:
    """EMA-fold frames into the running per-key state.

    ema: [..., S, n_freq] state (zero for keys with no frame yet).
    frames: [..., k, n_freq, S] new frames, oldest first.
    first_frame_of_key: [..., S] index (into the k new frames) of the first frame that may
        include each key: the frame whose hop block contains the key's arrival. Earlier
        frames are masked out. Keys older than the new frames have 0 or less.
    """
    g = cfg.frame_decay
    k = frames.shape[-3]
    idx = torch.arange(k, device=frames.device)
    # weight of frame f once all k are folded: (1 - g) * g**(k - 1 - f)
    weights = (1.0 - g) * torch.pow(torch.full((k,), g, dtype=torch.float64, device=frames.device),
                                    (k - 1 - idx).to(torch.float64)).to(frames.dtype)
    allowed = idx.view(k, 1) >= first_frame_of_key.unsqueeze(-2)        # [..., k, S]
    w = weights.view(k, 1) * allowed.to(frames.dtype)
    folded = (frames * w.unsqueeze(-2)).sum(dim=-3)                    # [..., n_freq, S]
    return ema * (g ** k) + folded.transpose(-1, -2)


@lru_cache(maxsize=16)
def _cached_basis_t(n_fft: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return dft_basis(n_fft, torch.device(device), dtype).T.contiguous()


def fold_rows(
    ema: torch.Tensor,
    prefix: torch.Tensor,
    rows: torch.Tensor,
    first_frame_of_key: torch.Tensor,
    cfg: SpectrogramConfig,
) -> torch.Tensor:
    """`fold_frames(ema, frame_magnitudes(prefix, rows), ...)`, one frame at a time.

    Same arguments and result as that pair, but much cheaper on CPU: every frame is one
    matmul over a *view* of its n_fft rows into a reused buffer, followed by in-place
    magnitude and a scaled add into the running sum, so nothing larger than one frame
    ([..., 2F, S]) is ever materialised and no large allocation is made per frame.
    Rows in bfloat16 are transformed in bfloat16 (half the matmul's time on CPUs with bf16
    instructions); the frames are summed into a state of `ema`'s dtype. Measured by
    bench/eval_speed_bench.py.
    """
    k = rows.shape[-2] // cfg.hop
    if k == 0:
        return ema
    if not (rows.shape[:-2] == prefix.shape[:-2] == ema.shape[:-2] == first_frame_of_key.shape[:-1]):
        raise ValueError(f"fold_rows needs equal batch shapes: rows {tuple(rows.shape)}, prefix "
                         f"{tuple(prefix.shape)}, ema {tuple(ema.shape)}, first frames {tuple(first_frame_of_key.shape)}")
    F, S, carry = cfg.n_freq, rows.shape[-1], cfg.carry
    basis_t = _cached_basis_t(cfg.n_fft, str(rows.device), rows.dtype)   # [2F, n_fft]
    batch = rows.shape[:-2]
    spec = rows.new_empty(*batch, 2 * F, S)
    re, im = spec[..., :F, :], spec[..., F:, :]
    acc = ema.new_zeros(*batch, F, S)        # the sum in the EMA's precision, whatever the rows'
    masks = _late_key_masks(first_frame_of_key, k)
    g = cfg.frame_decay
    for j in range(k):
        start = j * cfg.hop - carry          # first row of frame j, counted in `rows`
        if start >= 0:
            window = rows[..., start:start + cfg.n_fft, :]
        else:                                # the frame reaches back into the carry rows
            window = torch.cat([prefix[..., carry + start:, :], rows[..., :start + cfg.n_fft, :]], dim=-2)
        torch.matmul(basis_t, window, out=spec)
        re.mul_(re).addcmul_(im, im).sqrt_()  # |X| per bin, in place
        masks.apply(re, j)
        acc.add_(re, alpha=(1.0 - g) * g ** (k - 1 - j))
    # returned as a transposed view of [..., F, S]: the next call adds it back contiguously
    return acc.add_(ema.transpose(-1, -2), alpha=g ** k).transpose(-1, -2)


class _late_key_masks:
    """Zeroes frame j of the keys whose first frame is after j (keys that arrived later).

    Only keys arriving during the folded rows have such frames, and they sit at the end of
    the slots. When they are the same in every row and in arrival order (always, for keys
    appended by the cache), frame j's masked keys are a suffix: a plain slice fill.
    """

    def __init__(self, first_frame_of_key: torch.Tensor, frames: int):
        S = first_frame_of_key.shape[-1]
        late = (first_frame_of_key > 0).reshape(-1, S).any(0).nonzero()
        self.lo = int(late[0]) if late.numel() else S
        tail = first_frame_of_key[..., self.lo:]
        flat = tail.reshape(-1, S - self.lo) if self.lo < S else tail
        self.suffix = None
        if self.lo < S and bool((flat == flat[:1]).all()) and bool((flat[0, 1:] >= flat[0, :-1]).all()):
            # ascending first frames of the late keys: frame j zeroes the slots from starts[j] on,
            # found for every frame at once (one searchsorted per frame cost ~10% of a fold)
            ends = torch.searchsorted(flat[0].contiguous(), torch.arange(frames, device=flat.device), right=True)
            self.suffix = (ends + self.lo).tolist()
        self.tail = tail.unsqueeze(-2)

    def apply(self, magnitudes: torch.Tensor, j: int) -> None:
        if self.tail.shape[-1] == 0:
            return
        if self.suffix is not None:
            if self.suffix[j] < magnitudes.shape[-1]:
                magnitudes[..., self.suffix[j]:].zero_()
        else:
            magnitudes[..., self.lo:].masked_fill_(self.tail > j, 0.0)


def recency_embedding(age: torch.Tensor, cfg: SpectrogramConfig, interleaved: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of a token's age (newest position - its position).

    age: [...] integer or float tensor. Returns [..., recency_dim] float32 with
    w_i = max_freq**(-2i/d), i < d/2:
      official layout (default): [sin(a w_0), ..., sin(a w_{d/2-1}), cos(a w_0), ..., cos(a w_{d/2-1})],
          computed in float64 and then cast, as the official code builds its table;
      interleaved (NAMM format version 1): [sin(a w_0), cos(a w_0), sin(a w_1), ...] in float32.
    """
    half = cfg.recency_dim // 2
    dtype = torch.float32 if interleaved else torch.float64
    i = torch.arange(half, device=age.device, dtype=dtype)
    freqs = cfg.recency_max_freq ** (-2.0 * i / cfg.recency_dim)
    angles = age.to(dtype).unsqueeze(-1) * freqs
    if interleaved:
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)


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

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """Fold another set of moments into this one (Chan et al.'s parallel formula)."""
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / total)
        self.count = total
        return self

    @classmethod
    def from_stats(cls, mean, var, count) -> "RunningMoments":
        """Moments from a mean, a population variance and a count (as workers report them)."""
        mean = torch.tensor(mean, dtype=torch.float64).flatten()   # a copy: arrays from Ray are read-only
        moments = cls(mean.numel())
        moments.mean, moments.count = mean.clone(), float(count)
        moments.m2 = torch.tensor(var, dtype=torch.float64).flatten() * float(count)
        return moments

    def stats(self) -> dict:
        """{"mean", "var", "count"} as float32 numpy arrays and a float."""
        return {"mean": self.mean.float().numpy(), "var": self.var.float().numpy(), "count": float(self.count)}

    @property
    def var(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return self.m2 / self.count


__all__ = [
    "SpectrogramConfig", "frame_magnitudes", "fold_frames", "recency_embedding",
    "fold_rows", "RunningMoments", "hann_window",
]
