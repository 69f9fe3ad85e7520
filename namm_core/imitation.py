"""Warm start: fit a NAMM's scorer to imitate a baseline's keep decisions.

CMA-ES from the paper's mean 0 starts at "keep everything" and, with a budget, at an
arbitrary ranking; most of a small search is then spent finding what any decent memory
does. Here a baseline (StreamingLLM, H2O, TOVA, ...) manages the cache while an
`ImitationRecorder` collects, at every memory update, the NAMM's features of every cached
token together with the baseline's keep decision. `fit_scorer` then trains the (differentiable)
scorer by gradient descent to score kept tokens >= 0 and evicted ones < 0, a few seconds on
a CPU. The fitted parameters are a starting mean for evolution that begins near the
baseline's quality and searches upward from there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .namm import NAMM
from .policies import MemoryPolicy
from .scorers import fit_by_gradient


@dataclass
class ImitationData:
    """Per (update, layer, batch row, KV head): features [S, D], positions [S], valid [S], keep [S]."""
    features: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    keep: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def keep_rate(self) -> float:
        kept = sum(int((k & v).sum()) for k, v in zip(self.keep, self.valid))
        return kept / max(1, sum(int(v.sum()) for v in self.valid))


class ImitationRecorder(MemoryPolicy):
    """Runs `baseline` as the memory and records the NAMM's features and the baseline's decisions."""
    needs_attention = True

    def __init__(self, namm: NAMM, baseline: MemoryPolicy, data: ImitationData | None = None):
        self.namm, self.baseline = namm, baseline
        self.name = f"imitate-{baseline.name}"
        self.aux_shapes = {**namm.aux_shapes, **getattr(baseline, "aux_shapes", {})}
        self.data = data if data is not None else ImitationData()

    def new_sequence(self) -> None:
        self.namm.new_sequence()
        self.baseline.new_sequence()

    def bind_tokenizer(self, tokenizer) -> None:
        self.baseline.bind_tokenizer(tokenizer)

    def observe(self, layer_idx, layer, attn, step):
        self.namm.observe(layer_idx, layer, attn, step)
        if self.baseline.needs_attention:
            self.baseline.observe(layer_idx, layer, attn, step)

    def select(self, layer_idx, layer, step):
        features = self.namm.token_features(layer)
        keep = self.baseline.select(layer_idx, layer, step)
        if keep is None:
            keep = layer.valid.clone()
        B, H, S, D = features.shape
        for b in range(B):
            for h in range(H):
                self.data.features.append(features[b, h].detach().float().cpu().clone())
                self.data.positions.append(layer.positions[b, h].cpu().clone())
                self.data.valid.append(layer.valid[b, h].cpu().clone())
                self.data.keep.append(keep[b, h].cpu().clone())
        return keep

    def describe(self) -> str:
        return self.name


def fit_scorer(namm: NAMM, data: ImitationData, steps: int = 300, lr: float = 0.01, batch_rows: int = 32,
               seed: int = 0, max_seconds: float = 600.0) -> dict:
    """Train `namm`'s scorer in place to reproduce `data.keep` (score >= 0 kept, < 0 evicted).

    Class-balanced logistic loss on the valid slots of mini-batches of rows; Adam. Returns the
    fit's report: loss, the agreement of the sign rule with the baseline, and the agreement of
    the ranking (the top-k by score, with k the baseline's kept count per row).
    """
    if len(data) == 0:
        raise ValueError("no imitation data: the prompts were shorter than one memory update")
    gen = torch.Generator().manual_seed(seed)
    scorer = namm.scorer
    pos_rate = min(max(data.keep_rate, 1e-3), 1 - 1e-3)
    pos_weight = torch.tensor((1 - pos_rate) / pos_rate)

    def loss_of_a_step():
        idx = torch.randint(len(data), (min(batch_rows, len(data)),), generator=gen).tolist()
        x, positions, valid, keep = _batch(data, idx)
        scores = namm.score_features(x, positions, valid)
        return F.binary_cross_entropy_with_logits(scores[valid], keep[valid].float(), pos_weight=pos_weight)

    losses, seconds = fit_by_gradient(scorer, loss_of_a_step, steps, lr, gen, max_seconds)
    report = agreement(namm, data)
    report.update(loss=float(sum(losses[-20:]) / len(losses[-20:])), steps=len(losses),
                  seconds=seconds, keep_rate=data.keep_rate)
    return report


@torch.no_grad()
def agreement(namm: NAMM, data: ImitationData, batch_rows: int = 64) -> dict:
    """How often the NAMM decides as the baseline did: by sign, and by ranking at the baseline's count."""
    sign_hits = rank_hits = total = 0
    for start in range(0, len(data), batch_rows):
        idx = list(range(start, min(start + batch_rows, len(data))))
        x, positions, valid, keep = _batch(data, idx)
        scores = namm.score_features(x, positions, valid)
        sign_hits += int((((scores >= 0) == keep) & valid).sum())
        k = (keep & valid).sum(-1)
        ranked = scores.masked_fill(~valid, -math.inf).argsort(-1, descending=True)
        top = torch.zeros_like(keep)
        for r in range(len(idx)):
            top[r, ranked[r, : int(k[r])]] = True
        rank_hits += int(((top == keep) & valid).sum())
        total += int(valid.sum())
    return {"sign_agreement": sign_hits / max(1, total), "rank_agreement": rank_hits / max(1, total)}


def _batch(data: ImitationData, idx: list[int]):
    S = max(data.features[i].shape[0] for i in idx)
    D = data.features[idx[0]].shape[1]
    x = torch.zeros(len(idx), S, D)
    positions = torch.zeros(len(idx), S, dtype=torch.long)
    valid = torch.zeros(len(idx), S, dtype=torch.bool)
    keep = torch.zeros(len(idx), S, dtype=torch.bool)
    for r, i in enumerate(idx):
        n = data.features[i].shape[0]
        # padding goes in front, as invalid slots (the scorer sorts them out of every valid token's view)
        x[r, S - n:] = data.features[i]
        positions[r, S - n:] = data.positions[i]
        valid[r, S - n:] = data.valid[i]
        keep[r, S - n:] = data.keep[i]
    return x, positions, valid, keep
