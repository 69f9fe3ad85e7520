"""Scoring networks: map each cached token's 25 features to one score.

Both scorers are shared by every layer and KV head, start at zero (score 0 everywhere:
nothing is evicted), and expose their weights as one flat vector for evolution.

- BAM (backward attention memory, the paper's scorer): one attention head in which a
  token attends only to itself and *newer* tokens, so it can tell whether it has been
  superseded; its output modulates the features (x <- x * (1 + mult) + res) before a
  linear read-out. 4,172 parameters with 25 features and head dim 32.
- MLP: a per-token feed-forward network, the paper's ablation without token mixing.

The BAM's backward attention costs S^2/2 pairs per layer and KV head at every update; with a
window W each token attends to at most W newer tokens (S x W pairs), see `backward_attention`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class FlatParams(nn.Module):
    """Mixin: the module's parameters as one flat float32 vector."""

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_flat(self) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.parameters()).detach().float().cpu()

    def param_slices(self) -> dict[str, slice]:
        """Where each parameter tensor lies in the flat vector ("readout.weight" -> slice)."""
        out, at = {}, 0
        for name, p in self.named_parameters():
            out[name] = slice(at, at + p.numel())
            at += p.numel()
        return out

    def set_flat(self, vector) -> None:
        vec = torch.as_tensor(vector, dtype=torch.float32).flatten()
        if vec.numel() != self.num_params:
            raise ValueError(
                f"parameter vector has {vec.numel()} values; this scorer needs {self.num_params}")
        if not torch.isfinite(vec).all():
            bad = int((~torch.isfinite(vec)).sum())
            raise ValueError(f"parameter vector has {bad} non-finite values (NaN or inf)")
        ref = next(self.parameters())
        torch.nn.utils.vector_to_parameters(vec.to(ref.device, ref.dtype), self.parameters())


class BAMScorer(FlatParams):
    def __init__(self, in_dim: int = 25, head_dim: int = 32):
        super().__init__()
        self.in_dim, self.head_dim = in_dim, head_dim
        self.qkv = nn.Linear(in_dim, 3 * head_dim)
        self.modulation = nn.Linear(head_dim, 2 * in_dim)  # -> (res, mult)
        self.readout = nn.Linear(in_dim, 1)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                window: Optional[int] = None, window_keys: str = "recent") -> torch.Tensor:
        """x [N, S, in_dim], positions [N, S], valid [N, S] bool -> scores [N, S].

        Valid slots must be in ascending position order (the memory cache keeps them so).
        Slots are permuted to [invalid..., valid oldest..newest] and reversed; the backward
        mask is then an ordinary causal mask, which runs on sdpa's fused causal kernel
        (a dense S x S mask is 5x slower on CPU), and no valid token sees an invalid one.
        `window`, `window_keys`: see `backward_attention` (None: every newer token, the paper).
        """
        order = torch.argsort(valid.to(torch.int8), dim=-1, stable=True).flip(-1)  # newest valid first
        xs = x.gather(1, order.unsqueeze(-1).expand_as(x))
        q, k, v = self.qkv(xs).split(self.head_dim, dim=-1)
        attended = backward_attention(q, k, v, 1.0 / math.sqrt(self.head_dim), window, window_keys)
        res, mult = self.modulation(attended).split(self.in_dim, dim=-1)
        scores = self.readout(xs * (1.0 + mult) + res).squeeze(-1)
        return torch.empty_like(scores).scatter_(1, order, scores)


WINDOW_KEYS = ("recent", "band")   # NAMMConfig.bam_window_keys
# query rows per block where attention is computed without the fused kernel: bounds its memory
# at N x block x keys scores
_WINDOW_BLOCK = 1024


def backward_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       window: Optional[int] = None, keys: str = "recent") -> torch.Tensor:
    """q, k, v [N, S, d], rows ordered newest first: row r attends to rows <= r (itself and the
    tokens newer than it). Without a window that is a causal mask (S^2/2 pairs). With a window W
    each row attends to about W rows (S x W pairs):
    - keys "recent": itself and the W newest tokens of the cache (what the model has just read);
      a token among those W sees exactly what it sees without a window;
    - keys "band": itself and the W - 1 tokens that came right after it (its neighbourhood)."""
    S = q.shape[1]
    if window is None or S <= window:
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True,
                                              scale=scale).squeeze(1)
    if keys == "recent":
        return _recent_window_attention(q, k, v, scale, window)
    if keys == "band":
        return _band_attention(q, k, v, scale, window)
    raise ValueError(f"backward attention keys {keys!r}: expected one of {', '.join(WINDOW_KEYS)}")


def _recent_window_attention(q, k, v, scale, window):
    W = window
    # the W newest attend among themselves exactly as without a window
    newest = F.scaled_dot_product_attention(q[:, None, :W], k[:, None, :W], v[:, None, :W], is_causal=True,
                                            scale=scale).squeeze(1)
    # older rows attend to the W newest and to themselves: the W newest by a fused kernel that also
    # gives the log-sum-exp, then the token's own key joins the softmax exactly
    q_old, k_self, v_self = q[:, W:], k[:, W:], v[:, W:]
    recent, lse = attention_with_lse(q_old, k[:, :W], v[:, :W], scale)
    own = (q_old * k_self).sum(-1) * scale
    total = torch.logaddexp(lse, own)
    old = torch.exp(lse - total).unsqueeze(-1) * recent + torch.exp(own - total).unsqueeze(-1) * v_self
    return torch.cat([newest, old.to(newest.dtype)], dim=1)


# torch's fused CPU attention that also returns the log-sum-exp (a private op, present since
# torch 2.2); where it is missing, and on other devices, the same is computed in blocks
_FUSED_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q, k, v, scale, causal: bool = False, fused: bool = True):
    """q [*, Q, d], k, v [*, K, d] -> (softmax(q k^T scale) v [*, Q, d], log-sum-exp [*, Q]); with
    `causal`, query i sees keys j <= i only. * is one or two batch dimensions."""
    if q.dim() == 3:
        out, lse = attention_with_lse(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale, causal, fused)
        return out.squeeze(1), lse.squeeze(1)
    if fused and _FUSED_WITH_LSE is not None and q.device.type == "cpu":
        out, lse = _FUSED_WITH_LSE(q, k, v, is_causal=causal, scale=scale)[:2]
        return out, lse.float()
    outs, lses = [], []
    for start in range(0, q.shape[-2], _WINDOW_BLOCK):   # bounds memory at block x K scores per head
        logits = (q[..., start:start + _WINDOW_BLOCK, :] @ k.transpose(-1, -2)).float() * scale
        if causal:
            rows = torch.arange(start, start + logits.shape[-2], device=q.device).unsqueeze(-1)
            logits = logits.masked_fill(torch.arange(k.shape[-2], device=q.device) > rows, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.exp(logits - lse.unsqueeze(-1)).to(v.dtype) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _band_attention(q, k, v, scale, window):
    # blocks of W rows: row i of block b sees rows i' <= i of its own block (a causal mask) and
    # rows i' > i of the block before (a causal mask once both are reversed); two fused passes
    # with their log-sum-exps, joined exactly
    N, S, d = q.shape
    W = window
    blocks = -(-S // W)
    pad = blocks * W - S
    qb, kb, vb = (F.pad(t, (0, 0, 0, pad)).view(N, blocks, W, d) for t in (q, k, v))
    out, lse = attention_with_lse(qb, kb, vb, scale, causal=True)
    if W > 1 and blocks > 1:
        # reversed, row r of a block is its row W-1-r; keep rows 1.. of the queries (row W-1 of a
        # block sees nothing before it) and rows ..W-2 of the keys: then a causal mask is the band
        before, before_lse = attention_with_lse(qb[:, 1:].flip(2)[:, :, 1:], kb[:, :-1].flip(2)[:, :, :W - 1],
                                                vb[:, :-1].flip(2)[:, :, :W - 1], scale, causal=True)
        prev = out.new_zeros(out.shape)
        prev_lse = torch.full_like(lse, float("-inf"))
        prev[:, 1:, :W - 1] = before.flip(2)
        prev_lse[:, 1:, :W - 1] = before_lse.flip(2)
        total = torch.logaddexp(lse, prev_lse)
        out = torch.exp(lse - total).unsqueeze(-1) * out + torch.exp(prev_lse - total).unsqueeze(-1) * prev
    return out.reshape(N, blocks * W, d)[:, :S]


class MLPScorer(FlatParams):
    def __init__(self, in_dim: int = 25, hidden: tuple[int, ...] = (32,)):
        super().__init__()
        self.in_dim, self.hidden = in_dim, tuple(hidden)
        layers: list[nn.Module] = []
        d = in_dim
        for h in self.hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, **_) -> torch.Tensor:
        return self.net(x).squeeze(-1)   # no token mixing: a BAM window means nothing here


SCORER_KINDS = ("bam", "mlp")   # NAMMConfig.scorer


def build_scorer(kind: str, in_dim: int, **kwargs) -> FlatParams:
    if kind == "bam":
        return BAMScorer(in_dim=in_dim, head_dim=int(kwargs.get("head_dim", 32)))
    if kind == "mlp":
        return MLPScorer(in_dim=in_dim, hidden=tuple(kwargs.get("hidden", (32,))))
    raise ValueError(f"unknown scorer kind {kind!r}: expected one of {', '.join(SCORER_KINDS)}")


def fit_by_gradient(scorer: FlatParams, loss_of_a_step: Callable[[], torch.Tensor], steps: int, lr: float,
                    generator: torch.Generator, max_seconds: float, cosine: bool = False) -> tuple[list[float], float]:
    """Train a scorer in place with Adam (a cosine learning-rate schedule when `cosine`):
    `loss_of_a_step()` draws a batch and returns its loss. Returns (losses, seconds). All-zero
    weights are a saddle (a ReLU MLP gets no gradient at all): they start from small noise drawn
    from `generator`, before any batch is drawn."""
    if not scorer.get_flat().any():
        scorer.set_flat(torch.randn(scorer.num_params, generator=generator) * 0.05)
    scorer.train()
    optimiser = torch.optim.Adam(scorer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if cosine else None
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        with torch.enable_grad():
            loss = loss_of_a_step()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if schedule is not None:
            schedule.step()
        losses.append(float(loss.detach()))
        if time.perf_counter() - t0 > max_seconds:
            break
    scorer.eval()
    return losses, time.perf_counter() - t0
