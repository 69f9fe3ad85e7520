"""Hindsight distillation: a warm start for a model-wide ("global") NAMM.

A memory has to decide what to keep before it has seen the question. Afterwards, the full
cache shows what was needed: the tokens the question and the reply attend to. Here

1. `hindsight_importance` runs the full cache once over prompt + reference reply and gives
   each prompt token its importance: the sum over the question's and reply's queries of the
   largest attention any layer and head paid it (one retrieval head looking at a needle counts;
   the many heads that spread attention over the recent text do not drown it);
2. `HindsightOracle` is the memory that keeps, at every update, the budget's most important
   tokens: an upper bound for any memory at that budget (it reads the future);
3. `DistillRecorder` runs a memory (the oracle, or the NAMM being fitted, as in DAgger) and
   records at every update the NAMM's features of every cached token in every layer and head,
   with the oracle's importance of each token;
4. `fit_global_scorer` trains the (differentiable) scorer so that the model-wide mean score,
   pooled over spans as the NAMM selects, ranks tokens as the importance does: a listwise
   cross-entropy between softmax(score) and the importance shares.

The fitted parameters are the mean CMA-ES starts from. `kvzip_importance` is the other teacher:
KVzip's reconstruction importance (namm_core.kvzip), which needs no answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .kvzip import KVzip
from .namm import NAMM
from .policies import Budget, MemoryPolicy, pool_over_slots, shared_selection
from .scorers import fit_by_gradient


class HindsightProbe(MemoryPolicy):
    """Full cache; for each query at position >= `start`, the max attention over layers and
    heads of every key position, summed over those queries (see `hindsight_importance`)."""
    needs_attention = True

    def __init__(self, start: int, length: int):
        self.start, self.length = start, length
        self.rows: dict[int, torch.Tensor] = {}      # query position -> [length] running max

    def observe(self, layer_idx, layer, attn, step):
        q_pos = step.query_positions[0]
        wanted = (q_pos >= self.start).nonzero().flatten().tolist()
        if not wanted:
            return
        key_pos = layer.positions[0, 0]               # full cache: every head holds every token
        peak = attn[0][:, wanted, :].float().amax(0)  # [Q, S] max over this layer's heads
        for i, q in enumerate(wanted):
            row = self.rows.setdefault(int(q_pos[q]), torch.zeros(self.length))
            row[key_pos] = torch.maximum(row[key_pos], peak[i].cpu())

    def importance(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("no query reached the probe's start: the question start is past the prompt")
        return torch.stack(list(self.rows.values())).sum(0)


def question_start(tokenizer, input_ids: torch.Tensor, question: str) -> int:
    """Position of the first token of `question` in the prompt (its last occurrence); the
    prompt's last 32 tokens if the question's tokens cannot be found (a chat template may
    merge them with their neighbours)."""
    ids = input_ids[0].tolist()
    q = tokenizer(question, add_special_tokens=False).input_ids[1:5]   # its first token may merge
    for i in range(len(ids) - len(q), -1, -1):
        if q and ids[i:i + len(q)] == q:
            return max(0, i - 1)
    return max(0, len(ids) - 32)


@torch.inference_mode()
def hindsight_importance(lm, input_ids: torch.Tensor, reply_ids: torch.Tensor, start: int) -> torch.Tensor:
    """[T + n] importance of every position of prompt + reply, from a full-cache run of both
    (`lm`: a MemoryManagedLM whose model is used; its policy is not)."""
    from .generation import MemoryManagedLM

    total = input_ids.shape[1] + reply_ids.shape[1]
    probe = HindsightProbe(start, total)
    MemoryManagedLM(lm.model, probe, update_every=10**9, chunk_size=lm.chunk_size).continuation_logprobs(
        input_ids, reply_ids)
    return probe.importance()


class KVzipProbe(KVzip):
    """KVzip keeping every token, noting each position's importance: the mean over every layer
    and KV head of its KVzip score (each token is scored once, by the update that saw it
    arrive; see `kvzip_importance`)."""

    def __init__(self, length: int):
        super().__init__("1.0")
        self.importance = torch.zeros(length)
        self.scored = torch.zeros(length, dtype=torch.bool)

    def select_all(self, layers, step):
        # only the positions scored at this update are written: a token keeps the importance of
        # the update that saw it arrive, when every layer (sliding-window ones too) still held it
        total = torch.zeros(self.importance.numel())
        count = torch.zeros(self.importance.numel())
        for layer in layers:
            positions = layer.positions[0][layer.valid[0]].cpu()
            total.index_add_(0, positions, layer.aux["kvzip"][0][layer.valid[0]].float().cpu())
            count.index_add_(0, positions, torch.ones(positions.numel()))
        new = (count > 0) & ~self.scored
        self.importance[new] = total[new] / count[new]
        self.scored |= new
        return super().select_all(layers, step)


@torch.inference_mode()
def kvzip_importance(lm, input_ids: torch.Tensor, reply_ids: torch.Tensor) -> torch.Tensor:
    """[T + n] KVzip's importance of every position, model-wide: how much the model needs the
    token to reconstruct its context, averaged over layers and KV heads, from a run that keeps
    every token and reconstructs at `lm`'s updates. Unlike `hindsight_importance` it needs no
    answer and no question (`lm`: a MemoryManagedLM with its tokenizer; its policy is not used)."""
    from .generation import MemoryManagedLM

    if lm.tokenizer is None:
        raise ValueError("kvzip_importance needs the tokenizer: MemoryManagedLM(..., tokenizer=tok)")
    if input_ids.shape[0] != 1:
        raise ValueError("kvzip_importance takes one prompt at a time")
    probe = KVzipProbe(input_ids.shape[1] + reply_ids.shape[1])
    MemoryManagedLM(lm.model, probe, update_every=lm.update_every, chunk_size=lm.chunk_size,
                    tokenizer=lm.tokenizer).continuation_logprobs(input_ids, reply_ids)
    return probe.importance


TEACHERS = ("hindsight", "kvzip")    # es.warm_start.imitate values that distil a model-wide NAMM


def _lookup(importance: torch.Tensor, layer) -> torch.Tensor:
    return importance.to(layer.positions.device)[layer.positions.clamp(0, importance.numel() - 1)]


class HindsightOracle(MemoryPolicy):
    """Keeps, model-wide, the `budget` most important tokens (protected ones first)."""
    name = "hindsight-oracle"

    def __init__(self, importance: torch.Tensor, budget, sinks: int = 4, pool: int = 1):
        self.importance, self.budget, self.sinks, self.pool = importance, Budget.parse(budget), sinks, pool

    def protected(self, layer):
        protected = layer.positions == layer.newest_positions()
        first = layer.positions.masked_fill(~layer.valid, 2**62).amin(-1, keepdim=True)
        return protected | ((layer.positions - first) < self.sinks)

    def select_all(self, layers, step):
        return shared_selection(layers, [_lookup(self.importance, layer) for layer in layers],
                                [self.protected(layer) for layer in layers], self.budget.tokens(step.seen),
                                kernel=self.pool)

    def describe(self) -> str:
        return f"{self.name}:{self.budget}"


@dataclass
class Group:
    """One update of one prompt: features [R = layers x heads, S, D] of the S tokens every layer
    holds, their positions [S], importance [S], protected [S] and the budget k."""
    features: torch.Tensor
    positions: torch.Tensor
    importance: torch.Tensor
    protected: torch.Tensor
    k: int


@dataclass
class DistillData:
    groups: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)


class DistillRecorder(MemoryPolicy):
    """Runs `acting` (a global-scope memory) while recording `namm`'s features and the importance."""
    needs_attention = True

    def __init__(self, namm: NAMM, acting: MemoryPolicy, importance: torch.Tensor, data: DistillData):
        if namm.config.scope != "global":
            raise ValueError("hindsight distillation fits a NAMM with scope 'global'")
        self.namm, self.acting, self.importance, self.data = namm, acting, importance, data
        self.aux_shapes = dict(namm.aux_shapes)
        self.name = f"distill-{getattr(acting, 'name', 'policy')}"

    def new_sequence(self) -> None:
        self.namm.new_sequence()

    def observe(self, layer_idx, layer, attn, step):
        self.namm.observe(layer_idx, layer, attn, step)

    def select_all(self, layers, step):
        first = layers[0]
        if first.valid.shape[0] != 1:
            raise ValueError("the distillation recorder takes one prompt at a time")
        valid = first.valid[0, 0]
        for layer in layers:
            if layer.valid.shape != first.valid.shape or not torch.equal(layer.valid, first.valid) or \
                    not torch.equal(layer.positions[layer.valid], first.positions[first.valid]):
                raise ValueError("the layers hold different tokens: the acting memory must be model-wide")
        features = torch.cat([self.namm.token_features(layer)[0][:, valid] for layer in layers])
        positions = first.positions[0, 0][valid]
        self.data.groups.append(Group(
            features=features.half().cpu(), positions=positions.cpu(),
            importance=self.importance[positions.clamp(0, self.importance.numel() - 1).cpu()].float(),
            protected=self.namm.protected(first)[0, 0][valid].cpu(),
            k=int(self.namm._budget.tokens(step.seen)[0])))
        return self.acting.select_all(layers, step)


# ------------------------------------------------------------------------------------------------
# the fit


def _batch(groups: list[Group], rows: Optional[int], gen: Optional[torch.Generator]):
    S = max(g.positions.numel() for g in groups)
    R = groups[0].features.shape[0] if rows is None else min(rows, groups[0].features.shape[0])
    D = groups[0].features.shape[-1]
    n = len(groups)
    x = torch.zeros(n, R, S, D)
    valid = torch.zeros(n, S, dtype=torch.bool)
    positions = torch.zeros(n, S, dtype=torch.long)
    importance = torch.zeros(n, S)
    protected = torch.zeros(n, S, dtype=torch.bool)
    k = torch.zeros(n, dtype=torch.long)
    for j, g in enumerate(groups):
        m = g.positions.numel()
        pick = torch.randperm(g.features.shape[0], generator=gen)[:R] if rows is not None else slice(None)
        # padding in front, as invalid slots (the scorer sorts them out of every valid token's view)
        x[j, :, S - m:] = g.features[pick].float()
        valid[j, S - m:] = True
        positions[j, S - m:] = g.positions
        importance[j, S - m:] = g.importance
        protected[j, S - m:] = g.protected
        k[j] = g.k
    return x, valid, positions, importance, protected, k


def model_wide_scores(namm: NAMM, x, valid, positions) -> torch.Tensor:
    """[n, S]: the mean over rows of the NAMM's scores, pooled over spans (as the NAMM selects)."""
    n, R, S, D = x.shape
    scores = namm.score_features(x.reshape(n * R, S, D), positions.repeat_interleave(R, 0),
                                 valid.repeat_interleave(R, 0)).view(n, R, S).mean(1)
    return pool_over_slots(scores, valid, namm.config.pool)


def listwise_loss(scores, valid, importance, protected, pool: int) -> torch.Tensor:
    """Cross-entropy between softmax(scores) and the importance shares over the unprotected tokens
    (the importance pooled like the scores: a span is as important as its most important token)."""
    free = valid & ~protected
    target = pool_over_slots(importance, valid, pool) * free
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    logp = torch.log_softmax(scores.masked_fill(~free, -1e9), dim=-1)
    return -(target * logp).sum(-1).mean()


@torch.no_grad()
def kept_share(namm: NAMM, groups: list[Group]) -> float:
    """Share of the unprotected importance the NAMM's own top-k keeps on these groups."""
    kept = total = 0.0
    for start in range(0, len(groups), 4):
        x, valid, positions, importance, protected, k = _batch(groups[start:start + 4], None, None)
        scores = model_wide_scores(namm, x, valid, positions)
        ranked = scores.masked_fill(protected, math.inf).masked_fill(~valid, -math.inf)
        order = ranked.argsort(-1, descending=True)
        top = torch.zeros_like(valid).scatter_(1, order, torch.arange(valid.shape[1]).expand_as(order) < k[:, None])
        free = valid & ~protected
        kept += float((importance * (top & free)).sum())
        total += float((importance * free).sum())
    return kept / max(total, 1e-12)


def fit_global_scorer(namm: NAMM, data: DistillData, steps: int = 1000, lr: float = 0.01,
                      groups_per_step: int = 8, rows_per_group: int = 24, seed: int = 0,
                      max_seconds: float = 3600.0, holdout: float = 0.2) -> dict:
    """Train `namm`'s scorer in place (Adam, cosine schedule) on `data`; every 1/holdout-th group
    is held out for the report. Returns loss, kept importance share (held out and trained on)
    and timings."""
    if len(data) == 0:
        raise ValueError("no distillation data: the prompts were shorter than one memory update")
    every = max(2, round(1 / holdout)) if holdout > 0 else 0
    held = [g for i, g in enumerate(data.groups) if every and i % every == every - 1]
    train = [g for i, g in enumerate(data.groups) if not (every and i % every == every - 1)] or held
    gen = torch.Generator().manual_seed(seed)

    def loss_of_a_step():
        idx = torch.randint(len(train), (groups_per_step,), generator=gen).tolist()
        x, valid, positions, importance, protected, _ = _batch([train[i] for i in idx], rows_per_group, gen)
        scores = model_wide_scores(namm, x, valid, positions)
        return listwise_loss(scores, valid, importance, protected, namm.config.pool)

    losses, seconds = fit_by_gradient(namm.scorer, loss_of_a_step, steps, lr, gen, max_seconds, cosine=True)
    return {"loss": sum(losses[-50:]) / len(losses[-50:]), "steps": len(losses), "groups": len(data),
            "seconds": seconds, "kept_share_train": kept_share(namm, train[:64]),
            "kept_share_heldout": kept_share(namm, held) if held else float("nan")}
